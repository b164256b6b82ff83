"""Test-session setup: 8 simulated CPU devices and exact float32 matmuls, before jax initialises."""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()

import jax  # noqa: E402  (must come after XLA_FLAGS)

# Parity tolerances below assume true float32 matmuls (TPU/GPU defaults are bf16/tf32 passes).
jax.config.update("jax_default_matmul_precision", "float32")


import pytest  # noqa: E402

from mora_jax.train import loop  # noqa: E402
from tests.helpers import CONFIG, memes_config, memes_overrides, run_script, write_memes  # noqa: E402


@pytest.fixture(scope="session")
def memes(tmp_path_factory):
  """A small raw Hateful Memes layout under <root>/raw (`memes_overrides(root)` points a run at it)."""
  root = tmp_path_factory.mktemp("memes")
  write_memes(root / "raw")
  return root


@pytest.fixture(scope="session")
def one_device_run(memes):
  """3 steps on 1 device (also prepares the dataset for the other runs)."""
  workdir = memes / "run_1dev"
  run_script("train.py", ["--config", CONFIG, "--workdir", workdir, *memes_overrides(memes, max_steps=3)])
  return workdir


@pytest.fixture(scope="session")
def eight_device_run(memes, one_device_run):
  workdir = memes / "run_8dev"
  run_script("train.py", ["--config", CONFIG, "--workdir", workdir, *memes_overrides(memes, max_steps=3)],
             devices=8)
  return workdir


@pytest.fixture(scope="session")
def straight_run(memes, one_device_run):
  """6 steps without interruption, in this process (8 devices), from the prefix cache."""
  workdir = memes / "straight"
  loop.train(memes_config(memes, {"max_steps": 6, "prefix_cache": "on"}), workdir)
  return workdir
