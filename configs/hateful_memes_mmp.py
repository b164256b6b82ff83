"""Hateful Memes with MMP: the prompting recipe in mora_jax/train/recipes.py (docs/prompts.md)."""

from mora_jax.train import recipes


def get_config():
  return recipes.get("hateful_memes", "mmp")
