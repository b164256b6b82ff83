"""Shared by the benchmark scripts: command line, best-of-N timing, a random CLIP checkpoint and batch."""

import argparse
import contextlib
import tempfile
import time

import jax
import numpy as np
import transformers

from mora_jax import clip


def parse_args(doc: str, default_batch: dict[str, int], repeats: int) -> argparse.Namespace:
  """--configs/--batch/--repeats, and prints the software versions and threads the timings come from."""
  parser = argparse.ArgumentParser(description=doc.splitlines()[0])
  parser.add_argument("--configs", nargs="+", default=list(default_batch))
  parser.add_argument("--batch", type=int, default=None,
                      help="default: " + ", ".join(f"{b} {name}" for name, b in default_batch.items()))
  parser.add_argument("--repeats", type=int, default=repeats)
  args = parser.parse_args()
  print(f"jax {jax.__version__} ({jax.devices()[0].platform}), {torch_line()}, best of {args.repeats}; {host_peak()}")
  return args


def torch_line() -> str:
  """The PyTorch peer's version and threads; the scripts without a peer also run where torch is absent."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ModuleNotFoundError:
    return "torch absent"
  return f"torch {torch.__version__} ({torch.get_num_threads()} threads)"


def matmul_gflops(size: int = 2048, repeats: int = 3) -> float:
  """The device's practical float32 matmul rate: a jitted size^3 matmul, best of `repeats`."""
  x = jax.random.normal(jax.random.PRNGKey(0), (size, size), jax.numpy.float32)
  matmul = jax.jit(lambda a: a @ a)
  seconds = best_seconds(lambda: matmul(x).block_until_ready(), repeats)
  return 2 * size**3 / seconds / 1e9


def host_peak() -> str:
  """The line that puts absolute times in context: the same kind of machine runs at very different speeds."""
  return f"practical float32 matmul peak {matmul_gflops():.1f} GFLOP/s (2048^3, same run)"


def best_seconds(fn, repeats: int) -> float:
  """Minimum wall time of `fn()` over `repeats` calls, after one warm-up call (jax compiles there)."""
  return interleaved_best_seconds([fn], repeats)[0]


def interleaved_best_seconds(fns, repeats: int) -> list[float]:
  """Best-of-N wall time of each function, timed in turn within every round (after one warm-up each)."""
  for fn in fns:
    fn()
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, t in zip(fns, times):
      start = time.perf_counter()
      fn()
      t.append(time.perf_counter() - start)
  return [min(t) for t in times]


@contextlib.contextmanager
def random_checkpoint(cfg: clip.CLIPConfig):
  """(a randomly initialised transformers.CLIPModel of `cfg`, a temporary directory holding its
  save_pretrained checkpoint), for the body of the `with`."""
  hf_model = transformers.CLIPModel._from_config(transformers.CLIPConfig(**cfg.to_hf_dict()))  # pylint: disable=protected-access
  with tempfile.TemporaryDirectory() as tmp:
    hf_model.save_pretrained(tmp)
    yield hf_model, tmp


def random_batch(cfg: clip.CLIPConfig, size: int, num_classes: int = 2):
  """(pixels NCHW, ids ending with EOS, attention mask, labels), up to 77 tokens."""
  rng = np.random.RandomState(0)
  v, t = cfg.vision, cfg.text
  length = min(77, t.max_position_embeddings)
  pixels = rng.randn(size, v.num_channels, v.image_size, v.image_size).astype(np.float32)
  ids = rng.randint(0, t.vocab_size - 1, (size, length))
  ids[:, -1] = t.eos_token_id
  return pixels, ids, np.ones_like(ids), rng.randint(0, num_classes, size)
