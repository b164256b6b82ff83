"""The full train step of mora_jax.train (forward, backward, AdamW) vs the PyTorch MoRA peer, with memory.

    python bench/train.py                                   # tiny and ViT-B/16, float32, this machine
    python bench/train.py --configs ViT-B/16 --batch 256 --dtype bfloat16 --no_peer --peak_tflops auto
    python bench/train.py --configs ViT-B/16 --start_layers 11 10 6 0   # temporaries per first adapted layer

The recipe is Food-101 MoRA (q, v from layer 10, or 1 on the 2-layer tiny config; rank 4; 101 classes). Our
step and the peer (transformers.CLIPModel + MoRA layers transcribed from docs/method.md, eager PyTorch, same
threads) are timed in turn in each round. Peak memory is XLA's compiled-step analysis (arguments + outputs +
temporaries - donated aliases), or the device's peak_bytes_in_use where the backend reports it (GPU/TPU).

Two FLOP counts per sample are printed. "analytic" is bench/flops.py's count of the step (the matmuls of the
forward, of the backward through the adapted layers and the head, and AdamW's update), the one the achieved
TFLOP/s and MFU use: MFU = analytic FLOPs of the step / step time / peak, the peak being --peak_tflops (e.g. the
datasheet's) or, with --peak_tflops auto, bench/peak.py's matmul rate at the step's dtype measured in this run.
"XLA" is the compiled step's cost_analysis, for comparison: on CPU it counts every dot (and elementwise op, so it
reads a little above the analytic count), but on GPU the matmuls run as cuBLAS/cuDNN custom calls that it leaves
out, so there it reads far below (issue 25: the ViT-B/16 step at batch 256 in bfloat16 read MFU 1.5% from it; by
the analytic 48.4 GFLOP/sample it ran at ~240 TFLOP/s, ~36% of the measured bfloat16 matmul rate).
"""

import argparse

import jax
import jax.numpy as jnp
import torch

from mora_jax import adapters, clip
from adapters import NUM_CLASSES, jax_step, torch_step
from flops import train_step_flops
from harness import host_peak, interleaved_best_seconds, random_batch, random_checkpoint
from peak import default_size, matmul_tflops

DEFAULT_BATCH = {"tiny": 32, "ViT-B/16": 8}


def peak_bytes(compiled) -> int:
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"]
  m = compiled.memory_analysis()
  return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def bench(name: str, batch_size: int, repeats: int, dtype, peer: bool) -> dict:
  cfg = clip.preset(name)
  start = min(10, cfg.vision.num_hidden_layers - 1, cfg.text.num_hidden_layers - 1)
  recipe = adapters.MoRAConfig(targets=("q_proj", "v_proj"), start_layer=start, rank=4, alpha=0.01, dropout=0.1)
  data = random_batch(cfg, batch_size, NUM_CLASSES)
  torch.manual_seed(0)
  with random_checkpoint(cfg) as (hf_model, tmp):
    ours = jax_step(tmp, recipe, data, dtype)
  steps = [ours, torch_step(hf_model, cfg, recipe, data)] if peer else [ours]
  seconds = interleaved_best_seconds(steps, repeats)
  xla_flops = (ours.compiled.cost_analysis() or {}).get("flops", float("nan"))
  analytic = train_step_flops(cfg, recipe, data[1].shape[1], batch_size, NUM_CLASSES).total  # random_batch's texts
  return dict(config=name, batch=batch_size, seconds=seconds[0], peer=seconds[1] if peer else None,
              memory=peak_bytes(ours.compiled), analytic_per_sample=analytic, xla_per_sample=xla_flops / batch_size)


def temporaries_by_start_layer(name: str, batch_size: int, start_layers, dtype) -> dict[int, float]:
  """MiB of XLA temporaries of the compiled step per first adapted layer: activations are kept only from the
  first layer whose output the gradients need, so this grows with the number of adapted layers."""
  cfg = clip.preset(name)
  data = random_batch(cfg, batch_size, NUM_CLASSES)
  out = {}
  with random_checkpoint(cfg) as (_, tmp):
    for start in start_layers:
      step = jax_step(tmp, adapters.MoRAConfig(targets=("q_proj", "v_proj"), start_layer=start), data, dtype)
      out[start] = step.compiled.memory_analysis().temp_size_in_bytes / 2**20
  return out


def peak_tflops_arg(value: str) -> float | str:
  """--peak_tflops: a number, or "auto" (measured in this run)."""
  return value if value == "auto" else float(value)


def measured_peak_tflops(dtype) -> float:
  """bench/peak.py's matmul rate at `dtype`, printed with how it was measured."""
  size = default_size(jax.devices()[0].platform)
  tflops = matmul_tflops(dtype, size, repeats=10)
  print(f"MFU against the measured {jnp.dtype(dtype).name} matmul rate {tflops:.4g} TFLOP/s "
        f"(bench/peak.py: {size}^3, best of 10, same run)")
  return tflops


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", nargs="+", default=list(DEFAULT_BATCH))
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="backbone weights and compute (adapters and optimizer stay float32)")
  parser.add_argument("--no_peer", action="store_true", help="skip the PyTorch peer (e.g. on a GPU host)")
  parser.add_argument("--peak_tflops", type=peak_tflops_arg, default=None,
                      help="the device's peak for MFU, in TFLOP/s, or 'auto': its matmul rate measured in this run")
  parser.add_argument("--start_layers", type=int, nargs="+", default=None,
                      help="instead of timing: compiled-step temporaries for these first adapted layers")
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.devices()[0].platform}), torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads), {args.dtype}, best of {args.repeats}; "
        f"{host_peak()}")
  if args.start_layers:
    print("| config | batch | start layer | temporaries (MiB) |\n|---|---|---|---|")
    for name in args.configs:
      batch = args.batch or DEFAULT_BATCH.get(name, 8)
      for start, mib in temporaries_by_start_layer(name, batch, args.start_layers, jnp.dtype(args.dtype)).items():
        print(f"| {name} | {batch} | {start} | {mib:.0f} |")
    return
  peak = measured_peak_tflops(args.dtype) if args.peak_tflops == "auto" else args.peak_tflops
  print("GFLOP/sample: analytic = bench/flops.py's matmul count of the step, which TFLOP/s and MFU use; XLA = the "
        "compiled step's cost_analysis (on GPU it leaves out the cuBLAS/cuDNN matmuls)")
  print("| config | batch | ms/step | steps/s | samples/s | peer samples/s | ours / peer | peak memory (MiB) "
        "| analytic GFLOP/sample | XLA GFLOP/sample | TFLOP/s (analytic) | MFU (analytic) |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for name in args.configs:
    r = bench(name, args.batch or DEFAULT_BATCH.get(name, 8), args.repeats, jnp.dtype(args.dtype), not args.no_peer)
    tflops = r["analytic_per_sample"] * r["batch"] / r["seconds"] / 1e12
    mfu = f"{100 * tflops / peak:.1f}%" if peak else "n/a"
    peer = (f"{r['batch'] / r['peer']:.1f} | {r['peer'] / r['seconds']:.2f}x" if r["peer"] else "n/a | n/a")
    print(f"| {name} | {r['batch']} | {1e3 * r['seconds']:.1f} | {1 / r['seconds']:.2f} | "
          f"{r['batch'] / r['seconds']:.1f} | {peer} | {r['memory'] / 2**20:.0f} | "
          f"{r['analytic_per_sample'] / 1e9:.4g} | {r['xla_per_sample'] / 1e9:.4g} | {tflops:.3g} | {mfu} |")


if __name__ == "__main__":
  main()
