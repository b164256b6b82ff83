"""The device's practical matmul rate: the peak bench/train.py's MFU is taken against with --peak_tflops auto.

    python bench/peak.py                          # bfloat16 and float32; 8192^3 on GPU/TPU, 2048^3 on CPU
    python bench/peak.py --size 4096 --repeats 20

A jitted size x size by size x size matmul (2 size^3 FLOPs) at jax's default matmul precision (the one the train
step runs at), best of `repeats` calls after a warm-up, each waited for with block_until_ready. It is what one
large matmul reaches on this device, below the datasheet's peak: an MFU against it says how far the step's
matmuls are from what the device does in practice.
"""

import argparse

import jax
import jax.numpy as jnp

from harness import best_seconds

DTYPES = ("bfloat16", "float32")


def default_size(platform: str) -> int:
  """8192^3 keeps an accelerator's matmul units busy over kernel launches; a CPU takes ~0.1 s for 2048^3."""
  return 2048 if platform == "cpu" else 8192


def matmul_tflops(dtype, size: int, repeats: int) -> float:
  """TFLOP/s of a jitted size^3 matmul in `dtype`, best of `repeats`."""
  x = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.dtype(dtype))
  matmul = jax.jit(lambda a: a @ a)
  seconds = best_seconds(lambda: matmul(x).block_until_ready(), repeats)
  return 2 * size**3 / seconds / 1e12


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=None, help="default: 8192 on GPU/TPU, 2048 on CPU")
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args()
  device = jax.devices()[0]
  size = args.size or default_size(device.platform)
  print(f"jax {jax.__version__} on {device.device_kind} ({device.platform}), {size}^3 matmul, best of {args.repeats}")
  for dtype in DTYPES:
    print(f"{dtype}: {matmul_tflops(dtype, size, args.repeats):.4g} TFLOP/s")


if __name__ == "__main__":
  main()
