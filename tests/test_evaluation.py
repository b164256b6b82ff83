"""Evaluation of a finished run: its trained parameters alone are restored, whatever optimizer state was saved."""

from mora_jax.train import evaluation, loop
from tests.helpers import memes_config


def test_a_run_with_a_frozen_head_re_evaluates_from_its_parameters_alone(memes):
  workdir = memes / "frozen_head"
  # lr multiplier 0: the head has no AdamW moments in the saved optimizer state, unlike every other partition.
  results = loop.train(memes_config(memes, {"max_steps": 2, "optim.lr_mults.head": 0}), workdir)
  again = evaluation.evaluate_run(workdir)
  assert again["checkpoint_step"] == results["checkpoint_step"] and again["test"] == results["test"]
