"""Faults injected into a short CPU run that checkpoints every step: SIGTERM right after a save, a damaged
latest (or best) checkpoint, no intact checkpoint at all, and folders the run cannot write.

Every run is in this process, through `cli.run` (what train.py and eval.py return as their exit status), so
that SIGTERM arrives at an exact step and one straight run is shared.
"""

import json
import os
import shutil
import signal
from pathlib import Path

import jax
import numpy as np
import pytest

import eval as eval_script
from mora_jax.train import checkpoint, cli, job, loop
from tests.helpers import assert_one_line_error, final_state, memes_config, train_losses

# 4 steps per epoch: checkpoints 1..6, of which a finished run keeps 5 and 6 (the latest two) and 4 (the best).
FLAGS = {"max_steps": 6, "checkpoint.every_steps": 1}


def train(memes, workdir, step_hook=None) -> int:
  """train.py's exit status for the run of FLAGS in `workdir`."""

  def main() -> int:
    loop.train(memes_config(memes, FLAGS), workdir, step_hook=step_hook)
    return 0

  return cli.run_main(main, debug=False)


def sigterm_at(at: int):
  return lambda step: os.kill(os.getpid(), signal.SIGTERM) if step == at else None


def array_file(step_dir: Path) -> Path:
  """The largest file of the arrays orbax wrote for a step's state (OCDBT data under state/d/)."""
  return max((step_dir / "state" / "d").iterdir(), key=lambda f: f.stat().st_size)


def damage(file: Path, how: str) -> None:
  if how == "truncate":
    with open(file, "r+b") as f:
      f.truncate(file.stat().st_size // 2)
  else:
    file.unlink()


def copy_of(run: Path, workdir: Path) -> Path:
  """A copy of a finished run without its results, so that re-running it must write them again."""
  shutil.copytree(run, workdir)
  (workdir / job.EVAL_FILE).unlink()
  return workdir


def assert_same_run(workdir, reference) -> None:
  """Same final checkpoint (bitwise) and same eval.json as the reference run."""
  (step_a, a), (step_b, b) = final_state(workdir), final_state(reference)
  assert step_a == step_b == FLAGS["max_steps"]
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert json.loads((workdir / job.EVAL_FILE).read_text()) == json.loads((reference / job.EVAL_FILE).read_text())


@pytest.fixture(scope="module")
def straight(memes):
  workdir = memes / "straight_saving_every_step"
  assert train(memes, workdir) == 0
  return workdir


def test_sigterm_right_after_a_save_exits_143_and_resumes(memes, straight, capsys):
  workdir = memes / "preempted"
  # Step 3 was just saved periodically; step 4 ends the epoch, whose validation and save come before stopping.
  for at in (3, 4):
    assert train(memes, workdir, sigterm_at(at)) == 143
    err = capsys.readouterr().err
    assert f"SIGTERM: saved a checkpoint at step {at}" in err and "run the same command to resume" in err, err
    assert "Traceback" not in err and "error:" not in err, err
  assert train(memes, workdir) == 0
  assert train_losses(workdir) == train_losses(straight)
  assert_same_run(workdir, straight)


def test_sigterm_during_the_test_writes_the_results_then_reaches_the_callers_handler(memes, straight, monkeypatch):
  """Past the last step nothing is left to save: the test finishes, and the SIGTERM goes on to the handler that
  was there before the run (a table of runs stops after this one; before, the signal was dropped)."""
  workdir = copy_of(straight, memes / "sigterm_in_test")
  real_test = loop.test
  monkeypatch.setattr(loop, "test", lambda *a, **k: (os.kill(os.getpid(), signal.SIGTERM), real_test(*a, **k))[1])
  received = []
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
  try:
    assert train(memes, workdir) == 0
    assert received == [signal.SIGTERM]
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert_same_run(workdir, straight)


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_previous_one_resumes(memes, straight, how, capsys):
  workdir = copy_of(straight, memes / f"damaged_{how}")
  file = array_file(workdir / "checkpoints" / "6")
  damage(file, how)
  assert train(memes, workdir) == 0
  out = capsys.readouterr()
  assert "Traceback" not in out.err, out.err
  warning = [line for line in out.out.splitlines() if line.startswith("warning: checkpoint")]
  assert len(warning) == 1 and str(file) in warning[0] and "step 5" in warning[0], out.out
  assert f"resumed from {workdir / 'checkpoints' / '5'} (step 5)" in out.out
  assert (workdir / "checkpoints" / checkpoint.DAMAGED / "6" / file.relative_to(workdir / "checkpoints" / "6")
          ).exists() == (how == "truncate")
  assert train_losses(workdir)[-1] == train_losses(straight)[-1]  # step 6 trained again, the same
  assert_same_run(workdir, straight)


def test_no_intact_checkpoint_is_one_error_and_nothing_is_moved(memes, straight, capsys):
  workdir = copy_of(straight, memes / "all_damaged")
  steps = checkpoint.Checkpointer(workdir / "checkpoints", read_only=True).all_steps()
  for step in steps:
    damage(array_file(workdir / "checkpoints" / str(step)), "delete")
  status = train(memes, workdir)
  assert_one_line_error(capsys.readouterr().err, status, f"no checkpoint in {workdir / 'checkpoints'} restores",
                        "Move that folder away")
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == steps


def test_eval_falls_back_from_a_damaged_best_checkpoint(memes, straight, capsys):
  workdir = copy_of(straight, memes / "best_damaged")
  best = workdir / "checkpoints" / "4"
  file = array_file(best)
  damage(file, "truncate")
  out = workdir / "fallback.json"
  assert eval_script.main(["--workdir", str(workdir), "--output", str(out)]) == 0
  printed = capsys.readouterr().out
  assert f"warning: checkpoint {best} does not restore ({file}); left it in place" in printed, printed
  assert f"evaluating {workdir / 'checkpoints' / '6'} (the best intact checkpoint" in printed, printed
  assert json.loads(out.read_text())["checkpoint_step"] == 6
  status = eval_script.main(["--checkpoint", str(best)])
  assert_one_line_error(capsys.readouterr().err, status, f"no checkpoint in {workdir / 'checkpoints'} restores",
                        f"step 4: {file}")


@pytest.mark.parametrize("blocked", ["checkpoints", "data_dir"])
def test_an_unwritable_folder_is_refused_before_the_first_step(memes, tmp_path, blocked, capsys):
  """A regular file where the folder must be (permission bits would not stop root)."""
  workdir, data_dir = tmp_path / "run", tmp_path / "data"
  path = workdir / "checkpoints" if blocked == "checkpoints" else data_dir
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("in the way")
  steps = []

  def main() -> int:
    loop.train(memes_config(memes, {**FLAGS, "data_dir": data_dir}), workdir, step_hook=steps.append)
    return 0

  status = cli.run_main(main, debug=False)
  assert_one_line_error(capsys.readouterr().err, status, f"{path} is not a writable folder")
  assert steps == [] and not (workdir / "metrics.jsonl").exists()
