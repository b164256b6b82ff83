"""easy-VQA in the multimodal-LLM setting (embedded CLIP vision tower + embedded Llama-style LM, both frozen) with
LoRA (one A for every token) on the LM: the recipe in mora_jax/train/recipes.py."""

from mora_jax.train import recipes


def get_config():
  return recipes.mllm("lora")
