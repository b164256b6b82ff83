"""Training-pipeline throughput at 224 px (decode, resize, crop, normalise, tokenize, batch) on easy-VQA.

    python bench/data.py                # 1 and 2 decoding threads, batch 64
    python bench/data.py --threads 1 2 4 --batches 20

Runs on the embedded easy-VQA (prepared once under --data_dir); its 64 px PNGs are upsampled to 224 px,
so the resize and normalisation cost is that of real 224 px training, while JPEG decoding of large photos
(MM-IMDb, Food-101) would add more per sample.
"""

import argparse
import tempfile
import time
from pathlib import Path

from mora_jax import data
from mora_jax.data import tokenizers


def samples_per_second(ds, tokenizer, batch_size: int, threads: int, num_batches: int) -> float:
  it = iter(data.batches(ds, batch_size, tokenizer, train=True, seed=0, num_threads=threads))
  next(it)  # start-up (thread pool, first reads) is not throughput
  start = time.perf_counter()
  for _ in range(num_batches):
    next(it)
  return batch_size * num_batches / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default="~/.cache/mora_jax/tfds")
  parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--batches", type=int, default=10)
  args = parser.parse_args()
  # Complete samples only: a missing image would skip decoding and flatter the figure.
  ds = data.load("easy_vqa", "train", Path(args.data_dir).expanduser()).scenario("complete")
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer = tokenizers.byte_level_clip_tokenizer(tmp)
  print("| decoding threads | batch | samples/s (224 px) |")
  print("|---|---|---|")
  for threads in args.threads:
    rate = samples_per_second(ds, tokenizer, args.batch, threads, args.batches)
    print(f"| {threads} | {args.batch} | {rate:.0f} |")


if __name__ == "__main__":
  main()
