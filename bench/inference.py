"""Inference cost of the prompt baselines against merged MoRA (plain CLIP weights), in one interleaved run.

    python bench/inference.py                                   # ViT-B/16 (random init) and the embedded CLIP
    python bench/inference.py --configs embedded --repeats 5

Per backbone, on the same device and batch (images, 77-token texts or the embedded CLIP's 24, a mix of the
three missing cases): merged MoRA (the backbone's recipe, folded into the weights: plain CLIP's computation),
DCP and MMP with their recipes (36 prompt tokens; depth 6 on ViT-B/16, 4 on the 4-layer embedded CLIP). Printed
per method: the extra tokens per layer, analytic multiply-accumulates (MACs) per sample of the linear layers,
attention matmuls and prompt modules (bench/flops.py; a FLOP is 2 MACs), XLA's own FLOP count of the compiled
forward, the trained parameters, and the best-of-N time per batch of the jitted forward, all methods timed in
turn in every round. The trained parameters per part follow in a second table.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from mora_jax import adapters, clip
from mora_jax.adapters import prompts
from mora_jax.backbones import embedded
from mora_jax.train import recipes
from flops import forward_macs
from harness import interleaved_best_seconds, parse_args, random_batch

DEFAULT_BATCH = {"ViT-B/16": 8, "embedded": 64}
RECIPE = {"ViT-B/16": "upmc_food101", "embedded": "easy_vqa", "tiny": "easy_vqa"}  # whose adapter settings
NUM_CLASSES = 101
METHODS = ("mora", "dcp", "mmp")


def backbone(name: str) -> clip.CLIP:
  """"embedded": the project's pre-trained small CLIP (built by a first easy-VQA run); else a random preset."""
  if name == "embedded":
    directory = Path("~/.cache/mora_jax").expanduser() / embedded.directory_name(0)
    if not embedded.is_built(directory):
      raise FileNotFoundError(f"{directory} is not built: run `python train.py` once (it pre-trains the embedded "
                              "CLIP), or pass --configs ViT-B/16.")
    return clip.from_pretrained(directory)
  return clip.init(clip.preset(name))


def method_config(method: str, config: str, model: clip.CLIPConfig):
  values = recipes.get(RECIPE[config], method).adapter.to_dict()
  layers = min(model.vision.num_hidden_layers, model.text.num_hidden_layers)
  if method == "mora":
    values["start_layer"] = min(values["start_layer"], layers - 1)
  else:
    values["depth"] = min(values["depth"], layers)
    values["length"] = values["length"] if config != "tiny" else 6
  return adapters.from_config(values)


def forward(clf: adapters.Classifier, data):
  """(a no-argument call computing one batch's logits, XLA's FLOPs of the compiled forward)."""
  graphdef, state = nnx.split(clf)
  jitted = jax.jit(lambda state, *x: nnx.merge(graphdef, state)(*x[:3], missing=x[3]))
  compiled = jitted.lower(state, *data).compile()
  flops = (compiled.cost_analysis() or {}).get("flops", float("nan"))
  return (lambda: jax.block_until_ready(compiled(state, *data))), flops


def bench_config(name: str, batch: int, repeats: int) -> list[dict]:
  base = backbone(name)
  model = base.config
  pixels, ids, mask, _ = random_batch(model, batch, NUM_CLASSES)
  data = (jnp.asarray(pixels), jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32),
          jnp.arange(batch, dtype=jnp.int32) % prompts.CASES)
  rows, calls = [], []
  for method in METHODS:
    adapter = method_config(method, name, model)
    clf = adapters.build_classifier(nnx.clone(base), adapter, NUM_CLASSES)
    if method == "mora":
      parts = adapters.count_parameters(clf)["per_partition"]
      parts = {k: v for k, v in parts.items() if k != "backbone" and v}
      parts["trained in all"] = sum(parts.values())
      clf = adapters.merge(clf)
    else:
      parts = prompts.parameter_parts(clf)
    call, flops = forward(clf, data)
    calls.append(call)
    prompt = None if method == "mora" else adapter
    extra = prompt.length if prompt else 0
    rows.append(dict(config=name, batch=batch, method=method, extra=extra, layers=model.vision.num_hidden_layers,
                     tokens=(model.vision.num_patches + 1 + extra, ids.shape[1] + extra),
                     macs=forward_macs(model, ids.shape[1], NUM_CLASSES, prompt, batch), xla_flops=flops / batch,
                     parts=parts))
  for row, seconds in zip(rows, interleaved_best_seconds(calls, repeats)):
    row["seconds"] = seconds
  return rows


def main():
  args = parse_args(__doc__, DEFAULT_BATCH, repeats=3)
  rows = [r for n in args.configs for r in bench_config(n, args.batch or DEFAULT_BATCH.get(n, 8), args.repeats)]
  print("| config | batch | method | extra tokens per layer | tokens (vision, text) | analytic GMACs/sample "
        "| / merged MoRA | XLA GFLOPs/sample | trained params | ms/batch | / merged MoRA |")
  print("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    ref = next(x for x in rows if x["config"] == r["config"] and x["method"] == "mora")
    extra = f"{r['extra']} in all {r['layers']}" if r["extra"] else "0"
    print(f"| {r['config']} | {r['batch']} | {'merged MoRA' if r['method'] == 'mora' else r['method'].upper()} | "
          f"{extra} | {r['tokens'][0]}, {r['tokens'][1]} | {r['macs'] / 1e9:.4g} | {r['macs'] / ref['macs']:.3f}x | "
          f"{r['xla_flops'] / 1e9:.4g} | {r['parts']['trained in all']:,} | {1e3 * r['seconds']:.1f} | "
          f"{r['seconds'] / ref['seconds']:.3f}x |")
  print("\n| config | method | trained parameters per part |")
  print("|---|---|---|")
  for r in rows:
    parts = ", ".join(f"{k} {v:,}" for k, v in r["parts"].items() if k != "trained in all")
    print(f"| {r['config']} | {r['method']} | {parts} |")


if __name__ == "__main__":
  main()
