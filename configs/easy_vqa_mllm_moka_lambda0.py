"""easy-VQA in the multimodal-LLM setting (embedded CLIP vision tower + embedded Llama-style LM, both frozen) with
MokA with lambda 0 (per-modality A and shared B, no cross-attention) on the LM: the recipe in mora_jax/train/recipes.py."""

from mora_jax.train import recipes


def get_config():
  return recipes.mllm("moka_lambda0")
