"""How fast the input side feeds the devices: decoding against worker processes, the pixel store, the training
loop's own host time per step, and how busy a real run keeps the device.

    python bench/feed.py --size 224 --workers 0 1 2 --store     # decode path per worker count, and the store
    python bench/feed.py --loop configs/easy_vqa_mora.py         # host ms/step: pipeline alone vs the loop
    python bench/feed.py --busy configs/easy_vqa_mora.py         # a run's samples/s and device-busy fraction

Decode and store: a synthetic manifest (--samples JPEG photos of 320-640 px on either side, smooth enough to
compress like photos, ~25-60 KB each, with 77-token texts; every image present, so every sample is decoded) is
prepared once under --data_dir; samples/s is the training pipeline's (`data.batches`: read, decode, resize, crop,
tokenize, batch; train order) over --batches batches after the first, at --size px, per worker count (0 = in the
main process). The store row reads the same batches from the pixel store; its one-time build is timed too.

Loop: the config's run is started (`loop.start`, data and caches ready) and its train step replaced by a jitted
function that returns its inputs' sums: the loop's host time per step (next batch, assembly, transfer, dispatch)
against the pipeline's alone (`next` on an iterator of the same batches).

Busy: the config's run with its real step: steady samples/s over --steps steps after compilation (waited for at
the end), and the fraction of that time the device is busy = the same number of steps run back to back on one
batch already on the device / the loop's time.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mora_jax import data
from mora_jax.data import pixel_store, preprocess, tokenizers
from mora_jax.reproduce import throughput
from mora_jax.train import config as config_lib
from mora_jax.train import loop


def rate(iterator, batch_size: int, num_batches: int) -> float:
  next(iterator)  # start-up (worker processes, thread pool, first reads) is not throughput
  begin = time.perf_counter()
  for _ in range(num_batches):
    next(iterator)
  return batch_size * num_batches / (time.perf_counter() - begin)


def decode_table(args) -> None:
  data_dir = Path(args.data_dir).expanduser()
  manifest = data_dir / f"photos{args.samples}" / "photos.jsonl"
  if not manifest.is_file():
    throughput.write_photos(manifest.parent, args.samples)
  m = data.Manifest(path=str(manifest))
  ds = data.load(data.MANIFEST, "train", data_dir, manifest=m, missing=data.Missing(rate=0.0), log=lambda _: None)
  prep = data.Preprocessing(image=preprocess.ImageProcessing.clip(args.size))
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer = tokenizers.byte_level_clip_tokenizer(tmp)
  mean_kb = np.mean([len(ds.source[i]["image"]) for i in range(min(len(ds.source), 200))]) / 1024
  print(f"{len(ds.source)} JPEGs of 320-640 px, mean {mean_kb:.0f} KB, at {args.size} px; batch {args.batch}, "
        f"{args.threads} batches at a time; host: {len(os.sched_getaffinity(0))} cores")
  print("| path | samples/s |\n|---|---|")
  options = dict(train=True, seed=0, prep=prep, num_threads=args.threads)
  for workers in args.workers:
    it = iter(data.batches(ds, args.batch, tokenizer, workers=workers, **options))
    print(f"| decode, {workers} worker processes | {rate(it, args.batch, args.batches):.0f} |", flush=True)
  if args.store:
    with tempfile.TemporaryDirectory(dir=data_dir) as root:
      workers = max(args.workers)
      store = pixel_store.open_or_build(ds.source, ds.name, ds.split, prep, Path(root), "on", workers, lambda _: None)
      print(f"| pixel store build, {workers} worker processes | {len(ds.source) / store.build_seconds:.0f} |")
      it = iter(data.batches(ds, args.batch, tokenizer, store=store, **options))
      print(f"| pixel store | {rate(it, args.batch, args.batches):.0f} |", flush=True)


def start_run(config_path: str, workdir: Path, overrides) -> loop.Run:
  config = config_lib.load(config_path)
  config_lib.apply_overrides(config, [tuple(o.split("=", 1)) for o in overrides], log=lambda _: None)
  return loop.start(config, workdir)


def trivial_step(run: loop.Run):
  """A jitted step that reads every input (so the transfer is not optimised away) and does nothing else."""

  def step(state, frozen, device_arrays, batch):
    del frozen, device_arrays
    return state, {"loss": sum(jnp.sum(v.astype(jnp.float32)) for v in jax.tree.leaves(batch))}

  return jax.jit(step, donate_argnums=(0,))


def loop_table(args) -> None:
  with tempfile.TemporaryDirectory() as workdir:
    run = start_run(args.loop, Path(workdir), args.override)
    steps = args.steps
    pipeline_it = run.task.train_batches(run.stage)
    next(pipeline_it)
    begin = time.perf_counter()
    for _ in range(steps * run.config.accum_steps):
      next(pipeline_it)
    pipeline_ms = 1e3 * (time.perf_counter() - begin) / steps
    run.train_step = trivial_step(run)
    loop_ms = 1e3 * throughput.steady_seconds(run, steps) / steps
  inputs = "cached" if run.task.caches else "decoded"
  print(f"{args.loop}, batch {run.config.batch_size}, {steps} steps, {inputs} inputs, {jax.devices()[0].device_kind}")
  print("| host time per step | ms |\n|---|---|")
  print(f"| pipeline alone | {pipeline_ms:.2f} |\n| loop, trivial step | {loop_ms:.2f} |\n"
        f"| loop beyond the pipeline | {loop_ms - pipeline_ms:.2f} |")


def busy_table(args) -> None:
  with tempfile.TemporaryDirectory() as workdir:
    run = start_run(args.busy, Path(workdir), args.override)
    loop_seconds = throughput.steady_seconds(run, args.steps)
    batch, _ = run.task.device_batch([next(run.train_iter) for _ in range(run.stage.accum_steps)])
    state = run.state_leaves
    begin = time.perf_counter()
    for _ in range(args.steps):
      state, metrics = run.train_step(state, run.frozen_leaves, run.task.device_arrays("train"), batch)
    jax.block_until_ready(metrics)
    bare_seconds = time.perf_counter() - begin
  samples = args.steps * run.config.batch_size
  inputs = "cached" if run.task.caches else "decoded"
  print(f"{args.busy}, batch {run.config.batch_size}, {args.steps} steps, {inputs} inputs, {jax.devices()[0].device_kind}")
  print("| run | samples/s | ms/step | device busy |\n|---|---|---|---|")
  print(f"| loop (steady) | {samples / loop_seconds:.0f} | {1e3 * loop_seconds / args.steps:.2f} | "
        f"{100 * bare_seconds / loop_seconds:.0f}% |")
  print(f"| bare step, batch on the device | {samples / bare_seconds:.0f} | {1e3 * bare_seconds / args.steps:.2f} | "
        "100% |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default="~/.cache/mora_jax/bench_feed")
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--samples", type=int, default=512)
  parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--threads", type=int, default=2, help="batches assembled at once (config.data_threads)")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--batches", type=int, default=6)
  parser.add_argument("--store", action="store_true", help="also build and read the pixel store")
  parser.add_argument("--loop", metavar="CONFIG", help="the loop's host time per step for this config")
  parser.add_argument("--busy", metavar="CONFIG", help="a run's samples/s and device-busy fraction for this config")
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
  args = parser.parse_args()
  if args.loop:
    loop_table(args)
  if args.busy:
    busy_table(args)
  if not (args.loop or args.busy):
    decode_table(args)


if __name__ == "__main__":
  main()
