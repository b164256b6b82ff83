"""easy-VQA (embedded) with MoRA: the recipe in mora_jax/train/recipes.py (docs/method.md)."""

from mora_jax.train import recipes


def get_config():
  return recipes.get("easy_vqa", "mora")
