"""Evaluation of finished runs: re-tests, export, restores of the trained parameters alone."""

import json

import numpy as np
import pytest

from mora_jax.train import config as config_lib, evaluation, loop
from tests.helpers import ROOT, memes_config, memes_overrides, run_script, saved_test_results, train_losses


def test_eval_reproduces_the_test_numbers_and_exports_for_transformers(one_device_run):
  out, export = one_device_run / "again.json", one_device_run / "hf"
  run_script("eval.py", ["--workdir", one_device_run, "--output", out, "--export_hf", export])
  assert json.loads(out.read_text())["test"] == saved_test_results(one_device_run)
  assert {"config.json", "model.safetensors", "head.safetensors", "head.json"} <= {p.name for p in export.iterdir()}
  transformers = pytest.importorskip("transformers")
  assert transformers.CLIPTokenizer.from_pretrained(export)("a meme")["input_ids"][-1] == 515  # byte-level EOS
  pytest.importorskip("torch")
  model = transformers.CLIPModel.from_pretrained(export)
  assert model.config.text_config.hidden_size == 32


def test_checkpoint_from_8_devices_evaluates_the_same_on_2(eight_device_run):
  out = eight_device_run / "on2.json"
  run_script("eval.py", ["--workdir", eight_device_run, "--output", out], devices=2)
  assert json.loads(out.read_text())["test"] == saved_test_results(eight_device_run)


def test_moka_trains_and_is_tested_unmerged_and_reproducibly(memes, one_device_run):
  config = config_lib.load(ROOT / "configs" / "hateful_memes_moka.py")
  config_lib.apply_overrides(config, [tuple(flag[len("--config."):].split("=", 1)) for flag in
                                      memes_overrides(memes, max_steps=2, **{"head.type": "mlp"})])
  workdir = memes / "moka"
  results = loop.train(config, workdir)
  assert results["method"] == "moka" and results["merged"] is False
  assert all(np.isfinite(loss) for loss in train_losses(workdir))
  again = evaluation.evaluate_run(workdir)
  assert again["merged"] is False and again["test"] == results["test"]


def test_a_run_with_a_frozen_head_re_evaluates_from_its_parameters_alone(memes):
  workdir = memes / "frozen_head"
  # lr multiplier 0: the head has no AdamW moments in the saved optimizer state, unlike every other partition.
  results = loop.train(memes_config(memes, {"max_steps": 2, "optim.lr_mults.head": 0}), workdir)
  again = evaluation.evaluate_run(workdir)
  assert again["checkpoint_step"] == results["checkpoint_step"] and again["test"] == results["test"]
