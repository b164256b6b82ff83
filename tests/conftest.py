"""Test-session setup: 8 simulated CPU devices and exact float32 matmuls, before jax initialises."""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()

import jax  # noqa: E402  (must come after XLA_FLAGS)

# Parity tolerances below assume true float32 matmuls (TPU/GPU defaults are bf16/tf32 passes).
jax.config.update("jax_default_matmul_precision", "float32")


import pytest  # noqa: E402

from tests.helpers import write_memes  # noqa: E402


@pytest.fixture(scope="module")
def memes(tmp_path_factory):
  """A small raw Hateful Memes layout under <root>/raw (`memes_overrides(root)` points a run at it)."""
  root = tmp_path_factory.mktemp("memes")
  write_memes(root / "raw")
  return root
