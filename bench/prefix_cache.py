"""Epoch time with and without the prefix-activation cache, the PyTorch MoRA peer's epoch, and the four-scenario
test before and after shared tower passes, in one interleaved run.

    python bench/prefix_cache.py                                  # ViT-B/16 (start layer 10) and the embedded CLIP
    python bench/prefix_cache.py --configs embedded --epochs 3
    python bench/prefix_cache.py --configs ViT-B/16 --batch 256 --dtype bfloat16 --cache_dtype auto \
        --samples 4096 --epochs 4 --data_threads 16 --eval_batch 256 --no_peer --no_uncached --whole_epochs \
        --test_repeats 0   # a GPU's cached epoch alone (bench/device_check.sh)

Each config trains MoRA (q, v; rank 4) with the library's own loop (`loop.start`, then `loop.advance`, the step
`loop.train_epoch` repeats) on a fixed synthetic manifest (random 64 px PNGs and short texts, 70% missing of type
both), once with `prefix_cache="off"` and once with "on" (float32 unless --cache_dtype; on the devices where the
library's device tier holds it, else in host memory), and the peer (--no_uncached and --no_peer leave those runs
out): step by step in turn, so that all three see the same machine load, each epoch's time the sum of its steps'.
With --whole_epochs each run's epoch is timed whole instead, the runs in turn epoch by epoch, its steps queued
without waiting for each, so that the device runs a step while the host reads the next batch, as `loop.train_epoch`
does: the end-to-end rate on an accelerator, which waiting after every step would leave idle between steps. Epoch 1
includes compilation, so the steady samples/s are the median over the later epochs; building the cached run's train
and validation caches (done in its `loop.start`, compilation included) is reported on its own. The peer is
transformers' CLIPModel with MoRA layers written from docs/method.md (bench/adapters.py), eager PyTorch, the same
threads, one step per batch of the epoch on a fixed batch: it reads no data, so the ratio against it leaves our
input pipeline in our time. ViT-B/16 has random weights (no download) and a byte-level tokenizer; the embedded CLIP
is the project's pre-trained one (built on first use).

The test: the library's test (`evaluation.scenario_metrics`: merged model, one pass per tower over the present
inputs plus the dummy, every scenario assembled) against the same merged model evaluated scenario by scenario
(four full passes, as the test ran before), both timed end to end including compilation, and checked equal.
"""

import argparse
import base64
import io
import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch
from PIL import Image

from mora_jax import adapters, data, sharding
from mora_jax.backbones import embedded
from mora_jax.models import hf
from mora_jax.train import config as config_lib
from mora_jax.train import evaluation, loop, prefix_cache, recipes
from mora_jax.train import step as step_lib
from mora_jax.train.writers import MetricWriter
from adapters import torch_step
from harness import host_peak, random_batch, random_checkpoint

# name -> (backbone overrides, start layer, batch, max_length)
CONFIGS = {
    "ViT-B/16": ({"backbone.path": "", "backbone.random_preset": "ViT-B/16"}, 10, 8, 77),
    "embedded": ({"backbone.path": "embedded"}, 1, 64, 24),
    "tiny": ({"backbone.path": "", "backbone.random_preset": "tiny"}, 1, 8, 24),
}
FOOD101_TRAIN = 61_127  # UPMC Food-101 training samples (docs/protocol.md)


def write_manifest(directory: Path, sizes: dict[str, int]) -> Path:
  """A manifest of random 64 px PNGs whose colour and text both carry the label (two classes)."""
  rng = np.random.RandomState(0)
  lines = []
  for split, count in sizes.items():
    for _ in range(count):
      label = int(rng.randint(2))
      pixels = rng.randint(0, 120, (64, 64, 3)).astype(np.uint8)
      pixels[..., label] += 120
      png = io.BytesIO()
      Image.fromarray(pixels).save(png, "PNG")
      image = base64.b64encode(png.getvalue()).decode()
      words = ("calm", "bright") if label == 0 else ("dark", "loud")
      lines.append(json.dumps({"image_base64": image, "text": f"a {words[rng.randint(2)]} scene {len(lines)}",
                               "label": f"class{label}", "split": split}))
  path = directory / "bench.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return path


def run_config(name: str, manifest: Path, workdir: Path, data_dir: Path, args, cache: str):
  overrides, start, batch, max_length = CONFIGS[name]
  c = recipes.get("upmc_food101", "mora")
  # A host memory budget beyond any --samples: a cache that the devices do not hold stays in host memory.
  values = {**overrides, "dataset": data.MANIFEST, "manifest.path": manifest, "data_dir": data_dir,
            "adapter.start_layer": start, "batch_size": args.batch or batch, "eval.batch_size": args.eval_batch,
            "epochs": args.epochs, "preprocessing.max_length": max_length, "backbone.dtype": args.dtype,
            "prefix_cache": cache, "prefix_cache_dtype": args.cache_dtype, "prefix_cache_memory_gb": 10**4,
            "prefix_cache_device_gb": args.cache_device_gb,
            "data_threads": args.data_threads, "log_every_steps": 10**6}
  config_lib.apply_overrides(c, [(key, str(value)) for key, value in values.items()])
  return loop.start(c, workdir / f"{name.replace('/', '_')}_{cache}")


def peer_step(name: str, run: loop.Run):
  """A no-argument call running one step of the PyTorch peer (the run's batch size, start layer and targets)."""
  cfg = run.task.backbone.model.config
  batch = run.config.batch_size
  recipe = adapters.MoRAConfig(targets=("q_proj", "v_proj"), start_layer=run.config.adapter.start_layer, rank=4)
  torch.manual_seed(0)
  if name == "embedded":
    import transformers  # pylint: disable=import-outside-toplevel
    directory = embedded.ensure(run.config.backbone.cache_dir, run.config.data_dir, log=lambda _: None)
    hf_model = transformers.CLIPModel.from_pretrained(directory, attn_implementation="eager")
    cfg = hf.read_config(directory)
  else:
    with random_checkpoint(cfg) as (model, _):
      hf_model = model
  return torch_step(hf_model, cfg, recipe, random_batch(cfg, batch))


def timed(fn) -> float:
  return timed_result(fn)[0]


def epoch_seconds(steps: dict, count: int, whole: bool) -> dict:
  """name -> seconds of `count` calls of each no-argument step of `steps`: the steps in turn, each waited for, or
  (`whole`) each name's calls in one go, waited for at the end only."""
  if whole:
    return {name: timed(lambda: jax.block_until_ready([step() for _ in range(count)])) for name, step in steps.items()}
  seconds = dict.fromkeys(steps, 0.0)
  for _ in range(count):
    for name, step in steps.items():
      seconds[name] += timed(lambda: jax.block_until_ready(step()))
  return seconds


def timed_result(fn):
  begin = time.perf_counter()
  result = fn()
  return time.perf_counter() - begin, result


def per_scenario_test(run: loop.Run):
  """The test as it ran before shared tower passes: the merged model, each scenario a full pass."""
  job = run.task
  clf = adapters.join(job.graphdef, {"backbone": job.params["backbone"], **run.state["params"]})
  graphdef, params = adapters.split(adapters.merge(clf))
  shardings = sharding.state_shardings(params["backbone"], job.mesh, job.rules)
  eval_step = step_lib.make_eval_step(graphdef, job.mesh, shardings, job.prep)
  test = job.load("test")
  return {kind: evaluation.evaluate_split(job, eval_step, adapters.trainable(params), params["backbone"],
                                          test.scenario(kind), kind) for kind in data.SCENARIOS}


def bench(name: str, manifest: Path, workdir: Path, data_dir: Path, args) -> dict:
  uncached = None if args.no_uncached else run_config(name, manifest, workdir, data_dir, args, "off")
  cached = run_config(name, manifest, workdir, data_dir, args, "on")
  build = sum(cache.build_seconds for cache in cached.task.caches.values())
  steps = {"cached": lambda: loop.advance(cached)}
  if uncached is not None:
    steps = {"uncached": lambda: loop.advance(uncached), **steps}
  if args.epochs and not args.no_peer:
    steps["peer"] = peer_step(name, cached)
  rows = [{"epoch": epoch + 1, **epoch_seconds(steps, cached.steps_per_epoch, args.whole_epochs)}
          for epoch in range(args.epochs)]
  train_cache = cached.task.caches["train"]
  on_device = train_cache.device is not None  # then `arrays` holds only the row keys
  activations = train_cache.device if on_device else train_cache.activations()
  stored = [*jax.tree.leaves(activations), *(train_cache.arrays[k] for k in prefix_cache.ROW_KEYS)]
  per_sample = sum(a.nbytes for a in stored) / train_cache.num_samples
  where = "devices" if on_device else "host memory" if train_cache.directory is None else "disk"
  r = dict(name=name, batch=cached.config.batch_size, layer=cached.config.adapter.start_layer,
           samples=len(cached.task.train_ds.source), epochs=rows, build=build, bytes_per_sample=per_sample,
           cache_dtype=activations.vision_hidden.dtype.name, cache_where=where)
  return {**r, **test_timings(cached, workdir, args.test_repeats)} if args.test_repeats else r


def test_timings(run: loop.Run, workdir: Path, repeats: int) -> dict:
  """The best of `repeats` timings of the test scenario by scenario and with shared tower passes."""
  job = run.task
  writer = MetricWriter(workdir / "test_writer")
  missing = data.Missing(**run.config.missing)
  test_times = {"per scenario": [], "shared passes": []}
  for _ in range(repeats):
    seconds, before = timed_result(lambda: per_scenario_test(run))
    test_times["per scenario"].append(seconds)
    seconds, after = timed_result(lambda: evaluation.scenario_metrics(job, run.state["params"], data.SCENARIOS,
                                                                      missing, writer, 0))
    test_times["shared passes"].append(seconds)
  writer.close()
  identical = all(before[k][m] == after[k][m] for k in data.SCENARIOS for m in before[k])
  return dict(test_samples=before["complete"]["samples"], test_before=min(test_times["per scenario"]),
              test_after=min(test_times["shared passes"]), identical=identical)


def report(r: dict) -> None:
  print(f"\n### {r['name']}: start layer {r['layer']}, batch {r['batch']}, {r['samples']} train samples, "
        f"cache {r['bytes_per_sample'] / 2**10:.1f} KiB per sample ({r['cache_dtype']}, on the {r['cache_where']})\n")
  print(f"cache build (train + validation splits, compilation included): {r['build']:.1f} s\n")
  if r["epochs"]:
    report_epochs(r)
  if "test_before" in r:
    report_test(r)


def report_test(r: dict) -> None:
  print(f"\ntest, four scenarios of {r['test_samples']} samples (compilation included): per scenario "
        f"{r['test_before']:.1f} s, shared tower passes {r['test_after']:.1f} s: "
        f"{r['test_before'] / r['test_after']:.2f}x; metrics identical: {r['identical']}")


def report_epochs(r: dict) -> None:
  print("| epoch | uncached (s) | cached (s) | PyTorch peer (s) | uncached / cached | peer / cached |")
  print("|---|---|---|---|---|---|")
  for e in r["epochs"]:
    seconds = {run: f"{e[run]:.1f}" if run in e else "n/a" for run in ("uncached", "peer")}
    ratios = {run: f"{e[run] / e['cached']:.2f}x" if run in e else "n/a" for run in ("uncached", "peer")}
    print(f"| {e['epoch']} | {seconds['uncached']} | {e['cached']:.1f} | {seconds['peer']} | {ratios['uncached']} | "
          f"{ratios['peer']} |")
  later = r["epochs"][1:] or r["epochs"]
  steady = {run: np.median([e[run] for e in later]) for run in later[0] if run != "epoch"}
  count = len(r["epochs"])
  which = {1: "epoch 1, compilation included", 2: "epoch 2"}.get(count, f"epochs 2-{count}, median")
  print(f"\nsteady samples/s ({which}): " + ", ".join(f"{run} {r['samples'] / s:,.0f}" for run, s in steady.items()))
  if "uncached" in steady:
    report_20_epochs(r, steady["uncached"], steady["cached"])


def report_20_epochs(r: dict, uncached: float, cached: float) -> None:
  """A 20-epoch run's time from the steady epoch times, with and without the cache (its build included)."""
  build_per_epoch = r["build"] / cached  # in units of one cached epoch
  ratio_20 = 20 * uncached / (20 * cached + r["build"])
  print(f"20 epochs at these rates: uncached {20 * uncached:.0f} s, cached {20 * cached + r['build']:.0f} s "
        f"(build included, {build_per_epoch:.2f} cached epochs): {ratio_20:.2f}x, i.e. "
        f"{100 * (1 - 1 / ratio_20):.0f}% of the training time saved; on Food-101's {FOOD101_TRAIN:,} samples: "
        f"{20 * uncached * FOOD101_TRAIN / r['samples'] / 3600:.1f} h -> "
        f"{(20 * cached + r['build']) * FOOD101_TRAIN / r['samples'] / 3600:.1f} h on this machine")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", nargs="+", default=["ViT-B/16", "embedded"], choices=sorted(CONFIGS))
  parser.add_argument("--epochs", type=int, default=3, help="0: only the cache build and the test")
  parser.add_argument("--samples", type=int, default=256, help="training samples")
  parser.add_argument("--test_samples", type=int, default=128)
  parser.add_argument("--test_repeats", type=int, default=2, help="best of this many timings of each test; 0: no test")
  parser.add_argument("--batch", type=int, default=None, help="default: " + ", ".join(
      f"{batch} {name}" for name, (_, _, batch, _) in CONFIGS.items()))
  parser.add_argument("--eval_batch", type=int, default=32, help="the cache build's and the test's batch")
  parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                      help="the backbone's weights and compute (auto: bfloat16 on GPU/TPU, float32 on CPU)")
  parser.add_argument("--cache_dtype", choices=prefix_cache.DTYPES, default="float32",
                      help="the cached activations' dtype (auto: the backbone's compute dtype)")
  parser.add_argument("--cache_device_gb", type=float, default=-1,
                      help="config.prefix_cache_device_gb (-1: half a GPU's or TPU's free memory, none on CPU)")
  parser.add_argument("--data_threads", type=int, default=2, help="image decoding threads (config.data_threads)")
  parser.add_argument("--no_peer", action="store_true", help="skip the PyTorch peer (e.g. on a GPU host)")
  parser.add_argument("--no_uncached", action="store_true", help="skip the run without the cache")
  parser.add_argument("--whole_epochs", action="store_true",
                      help="time each run's epoch whole, steps queued (the end-to-end rate on an accelerator)")
  args = parser.parse_args()
  print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); {host_peak()}")
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    manifest = write_manifest(tmp, {"train": args.samples, "validation": 16, "test": args.test_samples})
    for name in args.configs:
      report(bench(name, manifest, tmp / "runs", tmp / "data", args))


if __name__ == "__main__":
  main()
