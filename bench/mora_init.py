"""MoRA's effective weight at initialisation under each published recipe: how large the shared term alpha*S is
against the frozen W, and how far W' then is from 2W.

    python bench/mora_init.py                               # openai/clip-vit-base-patch16 (Hub or its cache)
    python bench/mora_init.py --backbone random:ViT-B/16    # a randomly initialised ViT-B/16, offline
    python bench/mora_init.py --backbone /path/to/hf_checkpoint --recipes upmc_food101
    python bench/mora_init.py --backbone random:tiny --start_layer 0    # seconds; what the tests run

At initialisation B_p = 0 and, in the published variant, m_c = m_p = ||W||_col, so per column
W' = W + ||W|| N_c / ||N_c|| with N_c = W + alpha S and S = U G U^T. Where alpha S is small against W, W' ~= 2W;
where it dominates, W' ~= W + ||W|| S / ||S||: W plus a random direction of W's own size. The column norms of
alpha S do not depend on the backbone's weights (S comes from the seeded A_c and B_c, the rank and the two tower
widths); those of W and the cosine between W' and W do. A cosine of 1 means W' = 2W.
"""

import argparse

import jax.numpy as jnp
import numpy as np

from mora_jax import adapters, clip
from mora_jax.adapters import common
from mora_jax.train import recipes

PUBLISHED = ("mm_imdb", "upmc_food101", "hateful_memes")


def load_backbone(name: str) -> clip.CLIP:
  if name.startswith("random:"):
    return clip.init(clip.preset(name.removeprefix("random:")), seed=0)
  return clip.from_pretrained(name)


def column_norms(kernel: jnp.ndarray) -> np.ndarray:
  """Per column of W (a row of the [in, out] kernel), the norm MoRA's magnitudes are measured in."""
  return np.linalg.norm(np.asarray(kernel, np.float64), axis=1)


def initial_weights(backbone: str, dataset: str, start_layer: int | None = None) -> dict[str, dict[str, np.ndarray]]:
  """Per tower, over every adapted projection of the recipe: column norms of alpha*S and of W, and the cosine
  between the columns of W' and W, at the recipe's initialisation."""
  config = recipes.get(dataset, "mora")
  if start_layer is not None:
    config.adapter.start_layer = start_layer
  cfg = adapters.from_config(config.adapter.to_dict())
  clf = adapters.build_classifier(load_backbone(backbone), cfg, num_classes=2, seed=config.seed)
  found = {}
  for target in common.targets(clf.backbone, cfg):
    tower, layer = target.tower, getattr(target.parent, target.name)
    kernel = np.asarray(layer.base.kernel[...], np.float64)
    u, g = layer.common.factors(tower)
    shared = cfg.alpha * np.asarray(u @ g @ u.T, np.float64)
    effective = np.asarray(layer.effective_kernel(), np.float64)
    cosine = np.sum(effective * kernel, axis=1) / (column_norms(effective) * column_norms(kernel))
    rows = found.setdefault(tower, {"shared": [], "kernel": [], "cosine": []})
    rows["shared"].append(column_norms(shared))
    rows["kernel"].append(column_norms(kernel))
    rows["cosine"].append(cosine)
  return {tower: {k: np.concatenate(v) for k, v in rows.items()} for tower, rows in found.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--backbone", default="openai/clip-vit-base-patch16",
                      help="a Hugging Face id or checkpoint directory, or random:<preset> (e.g. random:ViT-B/16)")
  parser.add_argument("--recipes", nargs="+", default=list(PUBLISHED), choices=sorted(recipes.PUBLISHED))
  parser.add_argument("--start_layer", type=int, default=None, help="default: the recipe's (10 for ViT-B)")
  args = parser.parse_args()
  print(f"backbone {args.backbone}; medians over every column of every adapted projection of the tower\n")
  print("| recipe | targets, rank, alpha | tower | ||alpha S||_col | ||W||_col | ratio | cos(W', W) |")
  print("|---|---|---|---|---|---|---|")
  for dataset in args.recipes:
    recipe = recipes.get(dataset, "mora").adapter
    for tower, values in initial_weights(args.backbone, dataset, args.start_layer).items():
      shared, kernel = np.median(values["shared"]), np.median(values["kernel"])
      print(f"| {dataset} | {'/'.join(recipe.targets)}, {recipe.rank}, {recipe.alpha} | {tower} | "
            f"{shared:.3g} | {kernel:.3g} | {shared / kernel:.3g} | {np.median(values['cosine']):.3f} |",
            flush=True)


if __name__ == "__main__":
  main()
