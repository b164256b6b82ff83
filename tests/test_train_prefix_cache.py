"""The prefix-activation cache and the shared tower passes of the test (mora_jax/train/prefix_cache.py).

Exactness: a cached run computes the frozen layers once in a separate jitted call instead of inside every step,
so its losses and parameters equal the uncached run's up to XLA fusing the same float32 operations differently
(measured: losses <= 6e-8, parameters <= 4e-6 after 20 Adam steps at lr 1e-2, whose normalised updates carry
last-bit gradient differences into the weights); bound 1e-5. Test metrics must be identical.
"""

import json
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

from mora_jax import adapters, data, sharding
from mora_jax.train import config as config_lib
from mora_jax.train import loop, prefix_cache
from mora_jax.train.job import build_job
from tests.helpers import final_state, memes_config, saved_test_results, train_losses

METHODS = ("mora", "lora", "dora", "moka", "linear")


def config_for(memes, method: str, **overrides):
  config = memes_config(memes, {"epochs": 3, "batch_size": 8, "max_steps": 20, **overrides})  # 8 steps an epoch
  config_lib.apply_overrides(config, [("adapter.method", method)], log=lambda _: None)
  return config


@pytest.mark.parametrize("method", METHODS)
def test_cached_training_and_test_equal_the_uncached_run(memes, one_device_run, method, capsys):
  runs = {}
  for mode in ("off", "on"):
    workdir = memes / f"cache_{method}_{mode}"
    loop.train(config_for(memes, method, prefix_cache=mode), workdir)
    runs[mode] = (train_losses(workdir), final_state(workdir)[1]["params"], saved_test_results(workdir))
  out = capsys.readouterr().out
  what = "final features" if method == "linear" else "inputs of layer 1"
  assert f"prefix cache of hateful_memes/train: the towers' {what}" in out
  (losses_off, params_off, test_off), (losses_on, params_on, test_on) = runs["off"], runs["on"]
  assert len(losses_on) == 20
  np.testing.assert_allclose(losses_on, losses_off, atol=1e-5, rtol=0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), params_on, params_off)
  assert test_on == test_off
  if method == "mora":
    # On the devices (a budget that holds the train and validation caches): the steps gather the same rows there.
    workdir = memes / "cache_mora_device"
    loop.train(config_for(memes, method, prefix_cache="on", prefix_cache_device_gb=1.0), workdir)
    log = capsys.readouterr().out
    assert "prefix cache of hateful_memes/train: the towers'" in log and "(devices)" in log, log[-2000:]
    np.testing.assert_allclose(train_losses(workdir), losses_on, atol=1e-5, rtol=0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), final_state(workdir)[1]["params"],
                 params_on)
    assert saved_test_results(workdir) == test_on
    # bfloat16 storage rounds the cached activations to 8 bits of mantissa: the losses move by ~1e-3.
    workdir = memes / "cache_mora_bfloat16"
    loop.train(config_for(memes, method, prefix_cache="on", prefix_cache_dtype="bfloat16"), workdir)
    np.testing.assert_allclose(train_losses(workdir), losses_on, atol=2e-2, rtol=0)
    assert train_losses(workdir) != losses_on


def built_job(memes, **overrides):
  job = build_job(config_for(memes, "mora", **overrides))
  return job, job.load("train")


def build(job, ds, log, memory=False):
  plan = prefix_cache.plan(job.config, adapters.from_config(job.config.adapter.to_dict()), uses=2)
  shardings = sharding.state_shardings(job.params["backbone"], job.mesh, job.rules)
  fill = prefix_cache.make_fill_step(job.graphdef, plan.layer, job.mesh, shardings, job.prep)
  return prefix_cache.build(job, ds, adapters.trainable(job.params), plan, fill, memory=memory, log=log,
                            desc="test")


def arrays(cache) -> dict:
  return {k: np.array(v) for k, v in cache.arrays.items()}  # copies: a rebuild replaces the files


@pytest.fixture(name="disk_job")
def fixture_disk_job(memes, one_device_run, tmp_path):
  """A job whose disk caches live in a fresh folder (the prepared data is shared through a link)."""
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  for entry in (memes / "data").iterdir():
    if entry.name != "prefix_cache":
      (data_dir / entry.name).symlink_to(entry)
  return built_job(memes, data_dir=data_dir, prefix_cache_memory_gb=0)


def test_disk_cache_equals_memory_cache_and_is_reused(disk_job):
  job, ds = disk_job
  logs = []
  disk = build(job, ds, logs.append)
  memory = build(job, ds, logs.append, memory=True)
  assert disk.directory is not None and (disk.directory / prefix_cache.META_FILE).is_file()
  jax.tree.map(np.testing.assert_array_equal, arrays(disk), arrays(memory))
  assert disk.arrays["vision_hidden"].shape[0] == len(ds.source) + 1  # the dummy's row last
  again = build(job, ds, logs.append)
  assert again.directory == disk.directory and any("reusing" in line for line in logs)
  # A batch takes the dummy row where the table says a modality is missing.
  table = np.zeros(len(ds.source), np.int8)
  table[0], table[1] = data.missing.IMAGE_MISSING, data.missing.TEXT_MISSING
  batch = disk.rows(np.array([0, 1, -1]), table)
  prefix = batch["inputs"]
  np.testing.assert_array_equal(prefix.vision_hidden[0], disk.arrays["vision_hidden"][-1])
  np.testing.assert_array_equal(prefix.text_hidden[1], disk.arrays["text_hidden"][-1])
  np.testing.assert_array_equal(prefix.text_hidden[0], disk.arrays["text_hidden"][0])
  assert batch["valid"].tolist() == [True, True, False]


def test_an_interrupted_build_is_completed(disk_job, monkeypatch):
  job, ds = disk_job
  reference = arrays(build(job, ds, print, memory=True))
  written = []
  original = prefix_cache._write  # pylint: disable=protected-access

  def killed_after_two(arrays_, values):
    if len(written) == 2:
      raise KeyboardInterrupt  # as a kill: the files and progress records of two batches stay behind
    written.append(1)
    original(arrays_, values)

  monkeypatch.setattr(prefix_cache, "_write", killed_after_two)
  with pytest.raises(KeyboardInterrupt):
    build(job, ds, print)
  monkeypatch.setattr(prefix_cache, "_write", original)
  directory = next((Path(job.config.data_dir) / "prefix_cache").iterdir())
  assert not (directory / prefix_cache.META_FILE).exists()
  logs = []
  completed = build(job, ds, logs.append)
  assert any("completing the build" in line and "after 2 batches" in line for line in logs), logs
  jax.tree.map(np.testing.assert_array_equal, arrays(completed), reference)


def test_a_corrupt_cache_file_is_rebuilt_with_a_warning(disk_job):
  job, ds = disk_job
  first = build(job, ds, print)
  reference = arrays(first)
  path = first.directory / "vision_hidden.npy"
  del first
  raw = bytearray(path.read_bytes())
  raw[-5] ^= 0xFF
  path.write_bytes(bytes(raw))
  logs = []
  rebuilt = build(job, ds, logs.append)
  assert any("warning" in line and str(path) in line and "rebuilding" in line for line in logs), logs
  jax.tree.map(np.testing.assert_array_equal, arrays(rebuilt), reference)


def test_another_start_layer_backbone_or_dtype_is_another_cache(disk_job, memes):
  job, ds = disk_job
  first = build(job, ds, print).directory
  others = {}
  for name, overrides in (("layer", {"adapter.start_layer": 0}), ("backbone", {"backbone.seed": 1}),
                          ("dtype", {"prefix_cache_dtype": "bfloat16"})):
    other_job, other_ds = built_job(memes, data_dir=job.config.data_dir, prefix_cache_memory_gb=0, **overrides)
    others[name] = build(other_job, other_ds, print).directory
  assert len({first, *others.values()}) == 4
  assert np.load(others["dtype"] / "vision_hidden.npy", mmap_mode="r").dtype == np.uint16  # bfloat16 bits
  # A folder whose cache.json names another key (copied or renamed by hand) is rebuilt, not trusted.
  meta = json.loads((first / prefix_cache.META_FILE).read_text())
  meta["key"]["layer"] = 0
  (first / prefix_cache.META_FILE).write_text(json.dumps(meta))
  logs = []
  build(job, ds, logs.append)
  assert any("another key" in line and "rebuilding" in line for line in logs), logs


def test_too_little_disk_space_is_one_clear_error(disk_job, monkeypatch):
  job, ds = disk_job
  monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10, 10, 1))  # pylint: disable=protected-access
  with pytest.raises(prefix_cache.CacheError, match="prefix_cache_dtype=bfloat16") as error:
    build(job, ds, print)
  assert str(Path(job.config.data_dir) / "prefix_cache") in str(error.value) and "GiB are free" in str(error.value)


def test_prefix_cache_options_are_checked(memes):
  config = config_for(memes, "mora")
  for key, value, fragment in (("prefix_cache", "always", "use one of"),
                               ("prefix_cache_dtype", "float16", "use one of"),
                               ("prefix_cache_memory_gb", "-1.0", ">= 0")):
    bad = config_for(memes, "mora")
    config_lib.override(bad, key, value)
    with pytest.raises(ValueError, match=fragment):
      prefix_cache.check(bad, None)
  prefix_cache.check(config, None)
  bf16_plan = prefix_cache.plan(config_for(memes, "mora", prefix_cache_dtype="bfloat16"), None, uses=2)
  assert bf16_plan.dtype == ml_dtypes.bfloat16 and bf16_plan.layer is None
  assert prefix_cache.plan(config, adapters.from_config(config.adapter.to_dict()), uses=1) is None  # auto
