"""easy-VQA in the multimodal-LLM setting (embedded CLIP vision tower + embedded Llama-style LM, both frozen) with
MokA with lambda 0 (per-modality A and shared B, no cross-attention) on the LM: the recipe in mora_jax/train/mllm.py."""

from mora_jax.train import mllm


def get_config():
  return mllm.recipe("moka_lambda0")
