"""The benchmark scripts run (smallest settings); their numbers are measured by hand, not asserted here."""

import importlib.util
import os
import subprocess
import sys

import pytest

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


def test_data_bench_runs(easy_vqa_data):
  out = subprocess.run([sys.executable, "bench/data.py", "--data_dir", str(easy_vqa_data), "--threads", "1",
                        "--batch", "4", "--batches", "1"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       check=True).stdout
  assert any(line.startswith("| 1 | 4 | ") for line in out.splitlines()), out


def test_mora_init_bench_runs():
  out = subprocess.run([sys.executable, "bench/mora_init.py", "--backbone", "random:tiny", "--start_layer", "0"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, check=True).stdout
  rows = [line.split("|") for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
  assert [(row[1].strip(), row[3].strip()) for row in rows] == [
      (dataset, tower) for dataset in ("mm_imdb", "upmc_food101", "hateful_memes") for tower in ("vision", "text")]
  assert all(float(row[4]) > 0 and 0 < float(row[7]) <= 1 for row in rows), out


def test_easyvqa_priors_bench_runs(easy_vqa_data):
  out = subprocess.run([sys.executable, "bench/easyvqa_priors.py", "--data_dir", str(easy_vqa_data)], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, check=True).stdout
  lines = out.splitlines()  # after TFDS's own preparation messages
  for start in ("question types in test: ", "majority answer (from train): ", "question words alone "):
    assert any(line.startswith(start) for line in lines), out


def test_train_bench_runs():
  pytest.importorskip("torch", reason="the benchmark's peer is PyTorch")
  out = subprocess.run([sys.executable, "bench/train.py", "--configs", "tiny", "--repeats", "1", "--batch", "4"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, check=True).stdout
  row = next(line for line in out.splitlines() if line.startswith("| tiny | 4 |")).split("|")
  assert row[7].strip().endswith("x") and float(row[8]) > 0, out  # ours / peer, peak memory


def test_train_bench_reports_temporaries_per_start_layer():
  pytest.importorskip("torch", reason="the benchmark builds its checkpoint with transformers' PyTorch CLIP")
  out = subprocess.run([sys.executable, "bench/train.py", "--configs", "tiny", "--batch", "4", "--start_layers", "1",
                        "0"], cwd=ROOT, env=ENV, capture_output=True, text=True, check=True).stdout
  rows = [line.split("|") for line in out.splitlines() if line.startswith("| tiny | 4 |")]
  assert [int(row[3]) for row in rows] == [1, 0], out
  assert float(rows[1][4]) >= float(rows[0][4]), out  # more adapted layers keep more activations


def _record(name, seed, accuracy):
  per_type = {f"accuracy_{q}": accuracy for q in ("yes/no", "color", "shape")}
  return {"name": name, "seed": seed, "trainable_parameters": 1000, "ms_per_step": 10.0 + seed,
          "test": {s: {"accuracy": accuracy - drop, **per_type}
                   for s, drop in {"complete": 0.0, "text_missing": 0.4, "image_missing": 0.2, "mix": 0.3}.items()}}


def test_study_tables_summarise_seeds_and_pair_aligned_with_mismatched():
  spec = importlib.util.spec_from_file_location("study_easyvqa", os.path.join(ROOT, "bench", "study_easyvqa.py"))
  study = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(study)
  records = [_record("LoRA", 0, 0.79), _record("LoRA", 1, 0.81), _record("LoRA, mismatched towers", 0, 0.70),
             _record("MoRA", 0, 0.85)]
  text = study.tables(study.summarise(records))
  lora = next(line for line in text.splitlines() if line.startswith("| LoRA | "))
  assert lora == "| LoRA | 1,000 | 10.5 | 80.0 ± 1.4 | 40.0 ± 1.4 | 60.0 ± 1.4 | 50.0 ± 1.4 | 2 |", text
  pairs = text.split("Aligned vs mismatched towers")[1].splitlines()
  # MoRA has no mismatched run, so only LoRA is paired; drops are complete minus each missing scenario.
  assert [line.split(" | ")[0] for line in pairs if line.startswith("| ") and "backbone" not in line] == [
      "| LoRA", "| LoRA, mismatched towers"], text
  assert "| LoRA, mismatched towers | 70.0 | 30.0 | 50.0 | 40.0 | 40.0 | 20.0 |" in text, text


def test_inference_bench_runs():
  out = subprocess.run([sys.executable, "bench/inference.py", "--configs", "tiny", "--repeats", "1", "--batch", "4"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, check=True).stdout
  rows = [line.split("|") for line in out.splitlines() if line.startswith("| tiny | 4 |")]
  assert [row[3].strip() for row in rows] == ["merged MoRA", "DCP", "MMP"], out
  assert all(row[-2].strip().endswith("x") for row in rows), out  # time / merged MoRA
  assert float(rows[1][7].rstrip("x ")) > 1 and float(rows[2][7].rstrip("x ")) > 1, out  # more MACs with prompts
