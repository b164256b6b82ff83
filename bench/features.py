"""Image+text feature throughput: our jitted Flax towers vs transformers.CLIPModel (PyTorch, CPU), one run.

    python bench/features.py                       # tiny and ViT-B/16, prints a markdown table
    python bench/features.py --configs tiny --repeats 2

Both models hold the same random weights (ours loaded from the PyTorch model's save_pretrained) and get the
same inputs; throughput is pairs/s for one image + one 77-token text. PyTorch runs in eager mode (no
torch.compile) with its default SDPA attention and with its "eager" attention implementation.
"""

import tempfile

import jax
import torch
import transformers
from flax import nnx

from mora_jax import clip
from harness import best_seconds, parse_args, random_batch

DEFAULT_BATCH = {"tiny": 64, "ViT-B/16": 8}


def bench_config(name: str, batch: int, repeats: int) -> dict:
  cfg = clip.preset(name)
  torch.manual_seed(0)
  hf_cfg = transformers.CLIPConfig(**cfg.to_hf_dict())
  peers = {impl: transformers.CLIPModel._from_config(hf_cfg, attn_implementation=impl).eval()  # pylint: disable=protected-access
           for impl in ("sdpa", "eager")}
  peers["eager"].load_state_dict(peers["sdpa"].state_dict())
  with tempfile.TemporaryDirectory() as tmp:
    peers["sdpa"].save_pretrained(tmp)
    model = clip.from_pretrained(tmp)
  pixels, ids, mask, _ = random_batch(cfg, batch)

  graphdef, state = nnx.split(model)

  @jax.jit
  def features(state, pixels, ids, mask):
    m = nnx.merge(graphdef, state)
    return m.get_image_features(pixels), m.get_text_features(ids, mask)

  ours = best_seconds(lambda: jax.block_until_ready(features(state, pixels, ids, mask)), repeats)
  row = dict(config=name, batch=batch, jax_pairs_per_s=batch / ours)
  tensors = [torch.tensor(a) for a in (pixels, ids, mask)]
  for impl, peer in peers.items():

    def run(peer=peer):
      with torch.inference_mode():
        peer.get_image_features(pixel_values=tensors[0])
        peer.get_text_features(input_ids=tensors[1], attention_mask=tensors[2])

    seconds = best_seconds(run, repeats)
    row[f"torch_{impl}_pairs_per_s"] = batch / seconds
    row[f"speedup_vs_torch_{impl}"] = seconds / ours
  return row


def main():
  args = parse_args(__doc__, DEFAULT_BATCH, repeats=5)
  print("| config | batch | ours (pairs/s) | torch sdpa (pairs/s) | torch eager-attn (pairs/s) "
        "| ours / torch sdpa | ours / torch eager-attn |")
  print("|---|---|---|---|---|---|---|")
  for name in args.configs:
    r = bench_config(name, args.batch or DEFAULT_BATCH.get(name, 8), args.repeats)
    print(f"| {r['config']} | {r['batch']} | {r['jax_pairs_per_s']:.1f} | {r['torch_sdpa_pairs_per_s']:.1f} "
          f"| {r['torch_eager_pairs_per_s']:.1f} | {r['speedup_vs_torch_sdpa']:.2f}x "
          f"| {r['speedup_vs_torch_eager']:.2f}x |")


if __name__ == "__main__":
  main()
