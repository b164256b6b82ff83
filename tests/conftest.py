"""Test-session setup, before jax initialises: 8 simulated CPU devices, exact float32 matmuls, a
persistent compilation cache and quick compilation; then the fixtures that several test files share, and the
groups that keep each shared fixture on one pytest-xdist worker (docs/testing.md)."""

import os
import resource
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()
# Compiled programs are kept in a folder of the checkout (ignored by git) that every test process and every
# train.py / eval.py / bench subprocess (they inherit these variables) reads and writes: a program compiled
# once is loaded, not compiled again, by later tests and processes. A size bound turns on jax's file lock, so
# concurrent workers never read a half-written entry. Programs compiled in under 0.1 s (an eager op's) are not
# kept: every write checks the folder, and with thousands of them the eager tests slowed most (the 3.11 leg:
# 623.7 s keeping everything, 528.0 s with this bound; docs/testing.md).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 * 2**30))
# Most tests spend their time compiling tiny programs, not running them: XLA's expensive optimization passes
# are off (no fast-math either way; other kernels may round the last bits differently, which the tolerances
# cover); `helpers.xla_optimized()` turns them back on where a test computes more than it compiles. 0 runs the
# whole suite optimized.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# PyTorch (the parity references) on one thread: its OpenMP threads spin, and two test workers share the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import jax  # noqa: E402  (must come after the variables above)

# Parity tolerances below assume true float32 matmuls (TPU/GPU defaults are bf16/tf32 passes).
jax.config.update("jax_default_matmul_precision", "float32")


import pytest  # noqa: E402

from mora_jax.train import loop  # noqa: E402
from tests.helpers import CONFIG, memes_config, memes_overrides, run_script, write_memes  # noqa: E402

# A test that uses one of these fixtures (directly or through another fixture) runs on the worker of its group,
# so each is built once per session and no two tests write its folders at the same time.
WORKER_GROUPS = {"memes": "memes", "easy_vqa_data": "easy_vqa"}
CPU_PROFILE = os.environ.get("MORA_JAX_TEST_CPU_PROFILE")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the marks (--dist loadgroup)
def pytest_collection_modifyitems(items):
  grouped, ungrouped = [], []
  for item in items:
    group = next((g for fixture, g in WORKER_GROUPS.items() if fixture in item.fixturenames), None)
    if group:
      item.add_marker(pytest.mark.xdist_group(group))
    (grouped if group else ungrouped).append(item)
  # The groups first: each is minutes of work on one worker, which the other tests then even out.
  items[:] = grouped + ungrouped


def _cpu_seconds() -> float:
  """CPU time of this process (all its threads) and of the subprocesses it has waited for."""
  own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):  # pylint: disable=unused-argument
  """With MORA_JAX_TEST_CPU_PROFILE=FILE, appends "CPU s<TAB>wall s<TAB>test" per test to FILE (docs/testing.md)."""
  if not CPU_PROFILE:
    yield
    return
  cpu, wall = _cpu_seconds(), time.perf_counter()
  yield
  with open(CPU_PROFILE, "a", encoding="utf-8") as f:
    f.write(f"{_cpu_seconds() - cpu:.2f}\t{time.perf_counter() - wall:.2f}\t{item.nodeid}\n")


@pytest.fixture(scope="session")
def easy_vqa_data(tmp_path_factory):
  """A data_dir with easy-VQA prepared (from the easy-vqa wheel; no download)."""
  from mora_jax import data  # pylint: disable=import-outside-toplevel
  data_dir = tmp_path_factory.mktemp("easy_vqa_data")
  data.prepare("easy_vqa", data_dir, log=lambda _: None)
  return data_dir


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
