"""The benchmark scripts run (smallest settings); their numbers are measured by hand, not asserted here."""

import dataclasses
import importlib.util
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mora_jax import adapters, clip, sharding
from mora_jax.adapters import optim, prompts
from mora_jax.data.inputs import Normalized
from mora_jax.train import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The scripts import mora_jax from this checkout (installed or not), on one simulated device.
ENV = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "PYTHONPATH": ROOT}


def test_features_bench_runs():
  pytest.importorskip("torch", reason="the benchmark's peer is PyTorch")
  out = subprocess.run([sys.executable, "bench/features.py", "--configs", "tiny", "--repeats", "1", "--batch", "4"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, check=True).stdout
  row = next(line for line in out.splitlines() if line.startswith("| tiny |"))
  assert row.count("x |") == 2, out


def test_adapters_bench_runs():
  pytest.importorskip("torch", reason="the benchmark's peer is PyTorch")
  out = subprocess.run([sys.executable, "bench/adapters.py", "--configs", "tiny", "--repeats", "1", "--batch", "4"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, check=True).stdout
  rows = [line.split("|") for line in out.splitlines() if line.startswith("| tiny | 4 |")]
  assert [row[3].strip() for row in rows[:7]] == ["none", "lora", "dora", "mora-materialized", "mora-fused",
                                                  "moka", "PyTorch MoRA peer"], out
  # merged inference / plain backbone, MokA forward / LoRA forward
  assert rows[7][3].strip().endswith("x") and rows[7][4].strip().endswith("x"), out


def test_prefix_cache_bench_runs():
  pytest.importorskip("torch", reason="the benchmark's peer is PyTorch")
  out = subprocess.run([sys.executable, "bench/prefix_cache.py", "--configs", "tiny", "--epochs", "1", "--samples",
                        "16", "--test_samples", "8", "--test_repeats", "1"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       check=True).stdout
  assert [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ") and "x |" in line] == \
      ["1"], out
  assert "metrics identical: True" in out and "cache build" in out, out


def test_feed_bench_runs(easy_vqa_data, tmp_path):
  out = subprocess.run([sys.executable, "bench/feed.py", "--data_dir", str(tmp_path), "--size", "32", "--samples", "12",
                        "--workers", "0", "1", "--store", "--batch", "4", "--batches", "1"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, check=True).stdout
  rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ") and "path" not in line]
  assert rows == ["decode, 0 worker processes", "decode, 1 worker processes", "pixel store build, 1 worker processes",
                  "pixel store"], out
  tiny = ["--override", "backbone.path=", "backbone.random_preset=tiny", f"data_dir={easy_vqa_data}", "batch_size=8",
          "eval.batch_size=8", "pixel_store=off", "data_workers=0", "--steps", "2"]
  out = subprocess.run([sys.executable, "bench/feed.py", "--loop", "configs/easy_vqa_mora.py", "--busy",
                        "configs/easy_vqa_mora.py", *tiny], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       check=True).stdout
  assert "| loop beyond the pipeline |" in out and "| loop (steady) |" in out, out


def test_mora_init_bench_runs():
  out = subprocess.run([sys.executable, "bench/mora_init.py", "--backbone", "random:tiny", "--start_layer", "0"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, check=True).stdout
  rows = [line.split("|") for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
  assert [(row[1].strip(), row[3].strip()) for row in rows] == [
      (dataset, tower) for dataset in ("mm_imdb", "upmc_food101", "hateful_memes") for tower in ("vision", "text")]
  assert all(float(row[4]) > 0 and 0 < float(row[7]) <= 1 for row in rows), out


def test_easyvqa_priors_bench_runs(easy_vqa_data, monkeypatch, capsys):
  """In process: it computes on the host only (TFDS and scikit-learn), no device."""
  monkeypatch.setattr(sys, "argv", ["easyvqa_priors.py", "--data_dir", str(easy_vqa_data)])
  _bench_module("easyvqa_priors").main()
  out = capsys.readouterr().out
  lines = out.splitlines()  # after TFDS's own preparation messages
  for start in ("question types in test: ", "majority answer (from train): ", "question words alone ",
                "matching task, the question alone ", "matching task, the image alone "):
    assert any(line.startswith(start) for line in lines), out


def test_train_bench_reports_temporaries_per_start_layer():
  pytest.importorskip("torch", reason="the benchmark builds its checkpoint with transformers' PyTorch CLIP")
  out = subprocess.run([sys.executable, "bench/train.py", "--configs", "tiny", "--batch", "4", "--start_layers", "1",
                        "0"], cwd=ROOT, env=ENV, capture_output=True, text=True, check=True).stdout
  rows = [line.split("|") for line in out.splitlines() if line.startswith("| tiny | 4 |")]
  assert [int(row[3]) for row in rows] == [1, 0], out
  assert float(rows[1][4]) >= float(rows[0][4]), out  # more adapted layers keep more activations


def test_inference_bench_runs():
  out = subprocess.run([sys.executable, "bench/inference.py", "--configs", "tiny", "--repeats", "1", "--batch", "4"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, check=True).stdout
  rows = [line.split("|") for line in out.splitlines() if line.startswith("| tiny | 4 |")]
  assert [row[3].strip() for row in rows] == ["merged MoRA", "DCP", "MMP"], out
  assert all(row[-2].strip().endswith("x") for row in rows), out  # time / merged MoRA
  assert float(rows[1][7].rstrip("x ")) > 1 and float(rows[2][7].rstrip("x ")) > 1, out  # more MACs with prompts


def _bench_module(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "bench", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _dot_macs(jaxpr) -> int:
  """Multiply-accumulates of every dot_general in a jaxpr and the jaxprs inside it (a scan's, times its length)."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contracting, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contracting)
    for param in eqn.params.values():
      for inner in param if isinstance(param, (tuple, list)) else (param,):
        if hasattr(inner, "eqns"):
          total += eqn.params.get("length", 1) * _dot_macs(inner)
  return total


def _tiny_inputs(cfg, batch: int):
  """(pixels, ids, mask, missing) shaped as harness.random_batch makes them: texts of min(77, positions) tokens."""
  rng = np.random.RandomState(0)
  v, length = cfg.vision, min(77, cfg.text.max_position_embeddings)
  ids = rng.randint(0, cfg.text.vocab_size - 1, (batch, length)).astype(np.int32)
  ids[:, -1] = cfg.text.eos_token_id
  return (rng.randn(batch, v.num_channels, v.image_size, v.image_size).astype(np.float32), ids, np.ones_like(ids),
          np.arange(batch, dtype=np.int32) % 3)


def _forward(clf):
  """The classifier's jitted forward on (pixels, ids, mask, missing), and its state."""
  graphdef, state = nnx.split(clf)
  return jax.jit(lambda state, *x: nnx.merge(graphdef, state)(*x[:3], missing=x[3])), state


def _train_step(clf):
  """The library's jitted train step of `clf` on one device, and its first state."""
  graphdef, params = adapters.split(clf)
  mesh = sharding.make_mesh((1, 1), ("data", "fsdp"), devices=jax.devices()[:1])
  schedule = step_lib.lr_schedule(1e-3, 1000, 0.1)
  tx = optim.adamw(schedule, 0.02)
  trainable = adapters.trainable(params)
  state = {"params": trainable, "opt": tx.init(trainable), "step": jnp.int32(0), "rng": jax.random.PRNGKey(0)}
  frozen = {"backbone": params["backbone"]}
  shardings = {"backbone": sharding.state_shardings(params["backbone"], mesh, sharding.REPLICATED_RULES)}
  step = step_lib.make_train_step(graphdef, tx, schedule, step_lib.classifier_loss(False), mesh, shardings)
  return step, state, frozen


def _step_batch(inputs, num_classes: int) -> dict:
  pixels, ids, mask, _ = inputs
  batch = {"inputs": Normalized(pixels, ids, mask, np.zeros(len(ids), np.int8)),
           "label": np.arange(len(ids), dtype=np.int32) % num_classes, "valid": np.ones(len(ids), bool)}
  return jax.tree.map(lambda v: v[None], batch)  # one micro-batch


@pytest.mark.parametrize("prompt", [None, prompts.MMPConfig(length=6, depth=2), prompts.DCPConfig(length=6, depth=2)],
                         ids=["plain", "mmp", "dcp"])
def test_forward_macs_are_the_forward_matmuls(prompt):
  flops = _bench_module("flops")
  cfg, batch = clip.preset("tiny"), 4
  inputs = _tiny_inputs(cfg, batch)
  forward, state = _forward(adapters.build_classifier(clip.init(cfg), prompt, 101))
  macs = _dot_macs(jax.make_jaxpr(forward)(state, *inputs))
  assert flops.forward_macs(cfg, inputs[1].shape[1], 101, prompt, batch) == macs / batch


@pytest.mark.parametrize("start_layer", [1, 0])
def test_train_step_flops_are_the_step_matmuls(start_layer):
  """The count transcribes the step: forward and backward FLOPs are exactly 2x the MACs of the dots jax traces
  for the classifier's forward and for the whole step, the update 20 FLOPs per trainable parameter."""
  flops = _bench_module("flops")
  cfg, batch, num_classes = clip.preset("tiny"), 4, 101
  mora = adapters.MoRAConfig(targets=("q_proj", "v_proj"), start_layer=start_layer, rank=4)
  clf = adapters.build_classifier(clip.init(cfg), mora, num_classes)
  inputs = _tiny_inputs(cfg, batch)
  counted = flops.train_step_flops(cfg, mora, inputs[1].shape[1], batch, num_classes)
  forward, state = _forward(clf)
  assert counted.forward == 2 * _dot_macs(jax.make_jaxpr(forward)(state, *inputs)) / batch
  step, state, backbone = _train_step(clf)
  step_macs = _dot_macs(jax.make_jaxpr(step)(state, backbone, _step_batch(inputs, num_classes)))
  assert counted.forward + counted.backward == 2 * step_macs / batch
  assert counted.update == 20 * adapters.count_parameters(clf)["trainable"] / batch


def test_train_step_flops_grow_with_the_adapted_layers():
  flops = _bench_module("flops")
  cfg = clip.preset("ViT-B/16")
  count = lambda start: flops.train_step_flops(cfg, adapters.MoRAConfig(start_layer=start), 77, 256, 101)
  last, first = count(11), count(0)
  assert last.total < count(10).total < first.total
  assert last.forward == pytest.approx(first.forward, rel=1e-4)  # the whole model's, plus the kernels' builds
  # Food-101 MoRA on ViT-B/16 at batch 256: ~41 GFLOP forward, ~48 with the backward through layers 10 and 11.
  assert count(10).forward / 1e9 == pytest.approx(41.09, abs=0.01)
  assert count(10).total / 1e9 == pytest.approx(48.37, abs=0.01)


def test_flops_match_xla_cost_analysis_on_cpu():
  """XLA's CPU cost analysis counts every dot (unlike GPU's, which leaves out the cuBLAS calls) and elementwise
  work besides: within 10% of the analytic count on the tiny preset widened to 128 (at width 32 the layer norms,
  softmax and GELU XLA also counts are as large as that margin; in ViT-B/16 they are ~1%)."""
  flops = _bench_module("flops")
  tiny = clip.preset("tiny")
  widen = dict(hidden_size=128, intermediate_size=512)
  cfg = dataclasses.replace(tiny, text=dataclasses.replace(tiny.text, **widen),
                            vision=dataclasses.replace(tiny.vision, **widen))
  batch, num_classes = 4, 101
  mora = adapters.MoRAConfig(targets=("q_proj", "v_proj"), start_layer=1, rank=4)
  clf = adapters.build_classifier(clip.init(cfg), mora, num_classes)
  inputs = _tiny_inputs(cfg, batch)
  counted = flops.train_step_flops(cfg, mora, inputs[1].shape[1], batch, num_classes)
  forward, state = _forward(clf)
  xla_forward = forward.lower(state, *inputs).compile().cost_analysis()["flops"] / batch
  assert xla_forward == pytest.approx(counted.forward, rel=0.1)
  step, state, backbone = _train_step(clf)
  xla_step = step.lower(state, backbone, _step_batch(inputs, num_classes)).compile().cost_analysis()["flops"] / batch
  assert xla_step == pytest.approx(counted.total, rel=0.1)


def test_train_bench_runs_and_reports_analytic_and_xla_flops_and_mfu():
  pytest.importorskip("torch", reason="the benchmark's peer is PyTorch")
  out = subprocess.run([sys.executable, "bench/train.py", "--configs", "tiny", "--repeats", "1", "--batch", "4",
                        "--peak_tflops", "auto"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       check=True).stdout
  assert "MFU against the measured float32 matmul rate " in out, out
  lines = out.splitlines()
  header = next(line for line in lines if line.startswith("| config |"))
  values = next(line for line in lines if line.startswith("| tiny | 4 |"))
  row = dict(zip((c.strip() for c in header.split("|")), (c.strip() for c in values.split("|"))))
  assert row["ours / peer"].endswith("x") and float(row["peak memory (MiB)"]) > 0, out
  # The script's recipe on the 2-layer tiny preset (q, v from layer 1, rank 4) and random_batch's 16-token texts.
  counted = _bench_module("flops").train_step_flops(clip.preset("tiny"), adapters.MoRAConfig(start_layer=1), 16, 4, 101)
  assert float(row["analytic GFLOP/sample"]) == pytest.approx(counted.total / 1e9, rel=1e-3), out
  assert float(row["XLA GFLOP/sample"]) > 0 and float(row["TFLOP/s (analytic)"]) > 0, out
  assert row["MFU (analytic)"].endswith("%"), out


def test_peak_bench_runs():
  out = subprocess.run([sys.executable, "bench/peak.py", "--size", "128", "--repeats", "1"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, check=True).stdout
  rates = [line.split(": ") for line in out.splitlines() if line.endswith(" TFLOP/s")]
  assert [dtype for dtype, _ in rates] == ["bfloat16", "float32"], out
  assert all(float(rate.split()[0]) > 0 for _, rate in rates), out
