"""MM-IMDb with DoRA: the recipe in mora_jax/train/recipes.py (docs/method.md)."""

from mora_jax.train import recipes


def get_config():
  return recipes.get("mm_imdb", "dora")
