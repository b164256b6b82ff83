"""The training loop end to end on small fixtures: sharding parity, multi-host, resume, corrupt images.

Runs that need another device count or several processes are subprocesses of the real scripts; the
resume test runs the loop in this process so that SIGTERM arrives at an exact step.
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from mora_jax.train import checkpoint, config as config_lib, loop
from tests.helpers import (CONFIG, ROOT, final_state, memes_config, memes_overrides, run_script, saved_test_results,
                           train_losses, two_processes, write_memes)


def test_eight_devices_and_fsdp_give_the_one_device_losses(memes, one_device_run, eight_device_run):
  fsdp = memes / "run_fsdp"
  run_script("train.py", ["--config", CONFIG, "--workdir", fsdp,
                          *memes_overrides(memes, max_steps=3, **{"mesh.fsdp": 4})], devices=8)
  reference = train_losses(one_device_run)
  assert len(reference) == 3
  np.testing.assert_allclose(train_losses(eight_device_run), reference, atol=1e-5, rtol=0)
  np.testing.assert_allclose(train_losses(fsdp), reference, atol=1e-5, rtol=0)
  assert json.loads((fsdp / "config.json").read_text())["mesh"] == {"data": -1, "fsdp": 4}


# train.py with a SIGTERM sent to process 1 alone after step 1, and the processes agreeing on it every 2 steps.
# The loop is patched once jax.distributed is initialised: importing it first would start the XLA backend.
PREEMPTED_TRAIN = """
import os, signal, sys
import jax
sys.argv = sys.argv[:1] + sys.argv[2:]
import train
initialize = jax.distributed.initialize

def initialize_then_patch(*args, **kwargs):
  initialize(*args, **kwargs)
  from mora_jax.train import loop
  loop.PREEMPTION_CHECK_EVERY = 2
  original, process = loop.train, jax.process_index()
  hook = lambda step: os.kill(os.getpid(), signal.SIGTERM) if step == 1 and process == 1 else None
  loop.train = lambda *a, **k: original(*a, step_hook=hook, **k)

jax.distributed.initialize = initialize_then_patch
sys.exit(train.main())
"""


def test_two_processes_match_one_and_their_checkpoint_restores_in_one(memes, one_device_run):
  """2 processes x 2 devices with the prefix cache give the losses of 1 device without it: the train split's cache
  built on disk by both processes, the validation split's in memory (a budget that holds only it), the test from
  shared tower passes. Then the 2 x 2 run again, preempted: a SIGTERM reaches process 1 alone after step 1; both
  agree on it at step 2, save and exit 143; run again, they resume and end with the first 2 x 2 run's losses and
  test metrics, bit for bit."""
  straight, workdir = memes / "run_2x2", memes / "run_2x2_preempted"
  shutil.rmtree(memes / "data" / "prefix_cache", ignore_errors=True)
  cached = memes_overrides(memes, max_steps=3, prefix_cache="on", prefix_cache_memory_gb=0.0002)  # 0.2 MiB
  outputs = two_processes(CONFIG, straight, cached)
  for status, log in outputs:
    assert status == 0, log[-3000:]
  log = outputs[0][1]
  assert "prefix cache of hateful_memes/train: written to" in log and "validation: the towers' inputs of layer 1" \
      in log and "(host memory)" in log, log[-3000:]
  np.testing.assert_allclose(train_losses(straight), train_losses(one_device_run), atol=1e-5, rtol=0)
  out = straight / "in_one.json"
  run_script("eval.py", ["--workdir", straight, "--output", out], devices=4)
  assert json.loads(out.read_text())["test"] == saved_test_results(straight)
  for status, log in two_processes(CONFIG, workdir, cached, PREEMPTED_TRAIN):
    assert status == 143 and "SIGTERM: saved a checkpoint at step 2" in log, log[-3000:]
  assert checkpoint.Checkpointer(workdir / "checkpoints", read_only=True).all_steps() == [2]
  resumed = two_processes(CONFIG, workdir, cached)
  for status, log in resumed:
    assert status == 0, log[-3000:]
  assert "resumed from" in resumed[0][1], resumed[0][1][-3000:]
  assert train_losses(workdir) == train_losses(straight)
  assert saved_test_results(workdir) == saved_test_results(straight)


def test_sigterm_then_resume_equals_a_straight_run_bitwise(memes, straight_run):
  config = memes_config(memes, {"max_steps": 6, "prefix_cache": "on"})
  resumed = memes / "resumed"

  def preempt(step):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  with pytest.raises(loop.Preempted, match="saved a checkpoint at step 3"):
    loop.train(config, resumed, step_hook=preempt)
  assert checkpoint.Checkpointer(resumed / "checkpoints", read_only=True).all_steps() == [3]
  loop.train(config, resumed)
  assert train_losses(resumed) == train_losses(straight_run)
  (step_a, a), (step_b, b) = final_state(straight_run), final_state(resumed)
  assert step_a == step_b == 6
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert saved_test_results(resumed) == saved_test_results(straight_run)


def test_sigkill_mid_save_resumes_from_the_last_complete_checkpoint(memes, straight_run, capsys):
  """Killed right after the asynchronous save of step 4 starts (train.py in a subprocess); resuming here (from step
  3 or 4, whichever was complete) ends with the parameters of the uninterrupted run (to 1e-6: the killed process
  ran without the test session's jax flags)."""
  workdir = memes / "killed"
  values = {"max_steps": 6, "prefix_cache": "on", "checkpoint.every_steps": 1}
  flags = memes_overrides(memes, **values)
  script = ("import os, signal, sys; sys.argv = sys.argv[:1] + sys.argv[2:]; import train; "
            "from mora_jax.train import loop; original = loop.train; "
            "hook = lambda step: os.kill(os.getpid(), signal.SIGKILL) if step == 4 else None; "
            "loop.train = lambda *a, **k: original(*a, step_hook=hook, **k); train.main()")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PYTHONPATH": str(ROOT)}
  proc = subprocess.run([sys.executable, "-c", script, "-", "--config", CONFIG, "--workdir", str(workdir), *flags],
                        env=env, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  capsys.readouterr()
  loop.train(memes_config(memes, values), workdir)
  assert "resumed from" in capsys.readouterr().out
  (_, a), (_, b) = final_state(workdir), final_state(straight_run)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=0), a, b)


@pytest.mark.parametrize("prefix_cache", ["off", "on"])
def test_corrupt_images_are_skipped_and_counted_when_asked(tmp_path, prefix_cache):
  write_memes(tmp_path / "raw", sizes=(("train", 32), ("dev", 8), ("test", 8)))
  for meme in (5, 41):  # one train sample, one test sample
    (tmp_path / "raw" / "img" / f"{meme:05d}.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")

  def config(skip_corrupt: bool):
    c = config_lib.load(CONFIG)
    config_lib.apply_overrides(c, [tuple(flag[len("--config."):].split("=", 1)) for flag in memes_overrides(
        tmp_path, epochs=1, skip_corrupt=skip_corrupt, prefix_cache=prefix_cache, **{"missing.rate": 0.0})])
    return c

  with pytest.raises(ValueError, match="00005.png"):  # the cache records it; its use re-raises the decode error
    loop.train(config(False), tmp_path / "refused")
  results = loop.train(config(True), tmp_path / "run")
  assert results["corrupt_skipped_in_training"] == 1
  counts = {kind: r["corrupt_skipped"] for kind, r in results["test"].items()}
  assert counts == {"complete": 1, "text_missing": 1, "image_missing": 0, "mix": 1}
  assert results["test"]["complete"]["samples"] == 7 and results["test"]["image_missing"]["samples"] == 8
