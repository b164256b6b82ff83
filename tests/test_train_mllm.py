"""The multimodal-LLM run end to end on tiny models (a random tiny CLIP and a random small Llama with the
embedded LM's tokenizer), through the training loop the CLIP runs use (`loop.train`): both stages, checkpoints,
eval.json, eval.py on the workdir, SIGTERM and resume, a damaged checkpoint, and two processes.

One straight run in this process (module fixture) is the reference of the others; the runs in this process save
every step (`checkpoint.every_steps=1`), so a finished one keeps stage-2 checkpoints 3 and 4. They ask the matching
task's questions (config.questions="match": stage 1 on easy-VQA's own, stage 2 and the test on the matching
task's); tests/test_reproduce.py runs an MLLM on easy-VQA's own questions end to end.
"""

import io
import json
import os
import shutil
import signal
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import jax
import numpy as np
import pytest

from mora_jax.data import missing as missing_lib
from mora_jax.data import vqa
from mora_jax.train import checkpoint, cli, config as config_lib, loop, writers
from tests.helpers import ROOT, final_state, saved_test_results, tiny_lm, two_processes

CONFIG = "configs/easy_vqa_mllm_moka.py"
STAGE1_STEPS, MAX_STEPS = 2, 4


@pytest.fixture(scope="module")
def setup_dirs(tmp_path_factory, easy_vqa_data):
  root = tmp_path_factory.mktemp("mllm")
  data_dir = easy_vqa_data
  lm_dir = tiny_lm(root / "lm", data_dir)
  return root, data_dir, lm_dir


def overrides(data_dir, lm_dir, **extra) -> list[str]:
  values = {"data_dir": data_dir, "lm.path": lm_dir, "backbone.path": "", "backbone.random_preset": "tiny",
            "stage1.steps": STAGE1_STEPS, "stage1.batch_size": 8, "max_steps": MAX_STEPS, "checkpoint.every_steps": 1,
            "eval.validation_samples": 32, "eval.test_samples": 32, "eval.batch_size": 32, "batch_size": 8,
            "log_every_steps": 1, "questions": "match", **extra}
  return [f"--config.{k}={v}" for k, v in values.items()]


def mllm_config(setup, **extra):
  """The MokA MLLM config with `overrides(..., **extra)` applied, as train.py applies its flags."""
  _, data_dir, lm_dir = setup
  config = config_lib.load(str(ROOT / CONFIG))
  config_lib.apply_overrides(config, [tuple(flag[len("--config."):].split("=", 1))
                                      for flag in overrides(data_dir, lm_dir, **extra)])
  return config


def losses(workdir, kind: str) -> list[float]:
  """The losses of metrics.jsonl's `kind` lines ("stage1/train" or "stage2/train"), in the order written."""
  return [r["loss"] for r in writers.read_metrics(workdir) if r["kind"] == kind]


def steps_of(workdir, kind: str) -> list[int]:
  return [r["step"] for r in writers.read_metrics(workdir) if r["kind"] == kind]


def saved_steps(directory: Path) -> list[int]:
  return checkpoint.Checkpointer(directory, read_only=True).all_steps()


@contextmanager
def sigterm_fails_the_test():
  """A SIGTERM that reaches this process outside the loop's own handler fails the test instead of killing it."""
  previous = signal.signal(signal.SIGTERM, lambda *_: pytest.fail("SIGTERM reached the test: the loop had no handler"))
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="module")
def straight(setup_dirs):
  """(workdir, the steps the step_hook saw, its output) of 2 stage-1 and 4 stage-2 steps without interruption, 8
  devices."""
  workdir, calls, out = setup_dirs[0] / "straight", [], io.StringIO()
  with redirect_stdout(out):
    loop.train(mllm_config(setup_dirs), workdir, step_hook=calls.append)
  return workdir, calls, out.getvalue()


def test_both_stages_checkpoints_eval_json_and_eval_py(setup_dirs, straight):
  """The straight run: step_hook after every optimizer step of both stages (each counting from 1), stage 1 in
  <workdir>/stage1 and stage 2 in <workdir>/checkpoints, one metrics.jsonl line per step and the validation of the
  stop mid-epoch saved without validation (as every task's loop does: validation comes at epochs' ends), eval.json
  of that checkpoint per missing scenario; eval.py on the workdir re-tests the same. Stage 1 trained on easy-VQA's
  own questions, stage 2 and the test on the matching task's."""
  workdir, calls, out = straight
  match = vqa.load("train", setup_dirs[1], missing_lib.Missing(rate=0.0), log=lambda _: None, questions="match")
  assert f"stage2: {len(match)} train samples" in out, out
  assert "easy_vqa/train: missing" in out and "easy_vqa/train match questions: missing" in out, out  # stage 1's, 2's
  assert calls == [1, 2, 1, 2, 3, 4]
  assert saved_steps(workdir / "stage1")[-1] == STAGE1_STEPS and saved_steps(workdir / "checkpoints") == [3, 4]
  assert steps_of(workdir, "stage1/train") == [1, 2] and steps_of(workdir, "stage2/train") == [1, 2, 3, 4]
  assert all(np.isfinite(losses(workdir, "stage1/train") + losses(workdir, "stage2/train")))
  assert not [r for r in writers.read_metrics(workdir) if r["kind"] == "stage2/val"]
  results = json.loads((workdir / "eval.json").read_text())
  assert results["task"] == "mllm" and results["method"] == "moka" and results["checkpoint_step"] == MAX_STEPS
  assert results["questions"] == "match"
  assert results["best_validation"] is None
  assert set(results["test"]) == {"complete", "text_missing", "image_missing", "mix"}
  for scenario in results["test"].values():
    assert scenario["samples"] == 32 and 0.0 <= scenario["exact_match"] <= 1.0
    assert set(scenario["per_question_type"]) <= set(vqa.MATCH_TYPES)
  assert cli.eval_main(["--workdir", str(workdir)]) == 0
  again = json.loads((workdir / "eval-both-0.7.json").read_text())
  assert again["checkpoint_step"] == results["checkpoint_step"] and again["test"] == results["test"]


def test_sigterm_in_stage_2_then_resume_equals_a_straight_run_bitwise(setup_dirs, straight):
  """SIGTERM after stage-2 step 2 saves that step and raises loop.Preempted; running again (with another max_steps:
  it may change between runs) skips the finished stage 1, trains stage-2 steps 3 and 4, and ends with the straight
  run's losses of both stages, its final checkpoint bit for bit, and its test results."""
  reference, _, _ = straight
  workdir, calls = setup_dirs[0] / "preempted", []

  def hook(step):
    calls.append(step)
    if len(calls) == STAGE1_STEPS + 2:  # stage-2 step 2: stage 2 counts its steps from 1 again
      os.kill(os.getpid(), signal.SIGTERM)

  with sigterm_fails_the_test(), pytest.raises(loop.Preempted, match="saved a checkpoint at step 2"):
    loop.train(mllm_config(setup_dirs, max_steps=3), workdir, step_hook=hook)
  assert calls == [1, 2, 1, 2]
  assert saved_steps(workdir / "stage1")[-1] == STAGE1_STEPS and saved_steps(workdir / "checkpoints") == [1, 2]
  assert not (workdir / "eval.json").exists()
  calls.clear()
  loop.train(mllm_config(setup_dirs), workdir, step_hook=calls.append)
  assert calls == [3, 4]
  assert steps_of(workdir, "stage2/train") == [1, 2, 3, 4]
  for kind in ("stage1/train", "stage2/train"):
    assert losses(workdir, kind) == losses(reference, kind), kind
  (step_a, a), (step_b, b) = final_state(workdir), final_state(reference)
  assert step_a == step_b == MAX_STEPS
  jax.tree.map(np.testing.assert_array_equal, a, b)
  results, expected = (json.loads((w / "eval.json").read_text()) for w in (workdir, reference))
  assert results["checkpoint_step"] == expected["checkpoint_step"] and results["test"] == expected["test"]


def array_file(step_dir: Path) -> Path:
  """The largest file of the arrays orbax wrote for a step's state (OCDBT data under state/d/)."""
  return max((step_dir / "state" / "d").iterdir(), key=lambda f: f.stat().st_size)


def test_a_damaged_latest_stage_2_checkpoint_is_moved_aside_and_the_previous_one_resumes(setup_dirs, straight,
                                                                                          capsys):
  """A copy of the straight run without eval.json, its stage-2 checkpoint 4 truncated: running again warns once,
  moves it to checkpoints/damaged/4, resumes from step 3, trains step 4 again (the straight run's loss, bit for
  bit), and ends with the straight run's final state and test results."""
  reference, _, _ = straight
  workdir = setup_dirs[0] / "damaged"
  shutil.copytree(reference, workdir)
  (workdir / "eval.json").unlink()
  file = array_file(workdir / "checkpoints" / "4")
  with open(file, "r+b") as f:
    f.truncate(file.stat().st_size // 2)
  capsys.readouterr()
  calls = []
  loop.train(mllm_config(setup_dirs), workdir, step_hook=calls.append)
  out = capsys.readouterr()
  assert "Traceback" not in out.err, out.err
  warning = [line for line in out.out.splitlines() if line.startswith("warning: checkpoint")]
  assert len(warning) == 1 and str(file) in warning[0] and "step 3" in warning[0], out.out
  assert f"resumed from {workdir / 'checkpoints' / '3'} (step 3)" in out.out, out.out
  assert (workdir / "checkpoints" / checkpoint.DAMAGED / "4" / file.relative_to(workdir / "checkpoints" / "4")
          ).exists()
  assert calls == [4]
  assert steps_of(workdir, "stage2/train") == [1, 2, 3, 4, 4]  # the copied lines, then step 4 again
  assert losses(workdir, "stage2/train")[-1] == losses(reference, "stage2/train")[-1]
  (step_a, a), (step_b, b) = final_state(workdir), final_state(reference)
  assert step_a == step_b == MAX_STEPS
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert saved_test_results(workdir) == saved_test_results(reference)


def test_two_processes_give_the_one_process_losses(setup_dirs, straight):
  """train.py on 2 processes x 2 simulated devices: both stages' losses are the straight run's (1 process x 8
  devices in this process: data parallelism changes only the order of the sums, to 1e-6 here, and a 1 x 4
  subprocess as reference would cost a cold start); both stages save their last step; the test covers all 32
  samples of each scenario, not one process's share."""
  reference, _, _ = straight
  _, data_dir, lm_dir = setup_dirs
  workdir = setup_dirs[0] / "two_processes"
  flags = overrides(data_dir, lm_dir, **{"checkpoint.every_steps": 0})  # only the stages' last steps: quicker
  for status, log in two_processes(ROOT / CONFIG, workdir, flags):
    assert status == 0, log[-3000:]
  for kind in ("stage1/train", "stage2/train"):
    expected = losses(reference, kind)
    assert len(expected) == {"stage1/train": STAGE1_STEPS, "stage2/train": MAX_STEPS}[kind]
    np.testing.assert_allclose(losses(workdir, kind), expected, atol=1e-5, rtol=0, err_msg=kind)
  assert saved_steps(workdir / "stage1") == [STAGE1_STEPS] and saved_steps(workdir / "checkpoints") == [MAX_STEPS]
  results = saved_test_results(workdir)
  assert set(results) == {"complete", "text_missing", "image_missing", "mix"}
  assert all(scenario["samples"] == 32 for scenario in results.values())
