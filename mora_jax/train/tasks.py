"""What the training loop (mora_jax.train.loop) needs of a task, the stages a task trains in, and the task of a
config:

    task = tasks.build(config, workdir)   # every check first; then the model, its parameters and data
    for stage in task.stages(): ...       # the loop trains each stage, then tests the last one's best checkpoint

Two tasks: classification with a CLIP classifier (mora_jax.train.classification; one stage) and question answering
with the multimodal LLM (mora_jax.train.answering, config.task == "mllm"; the projector's alignment, then the
adapters). A task holds its model as a graph and a partitioned parameter tree (mora_jax.adapters.partition);
a stage names the partitions it trains, and the loop passes the others to the step as frozen.
"""

import dataclasses
from pathlib import Path
from typing import Protocol

import jax
import ml_collections
import optax
from flax import nnx

from mora_jax.train import step as step_lib

MLLM = "mllm"  # the config's `task` value of the multimodal-LLM setting; configs without `task` classify


@dataclasses.dataclass(frozen=True)
class Stage:
  """One training stage: what it trains, how long, with what optimizer, and where it checkpoints."""
  name: str  # "" for a task's only stage; otherwise it prefixes the stage's log kinds ("stage1/train")
  directory: str  # its checkpoints, in the workdir
  trained: tuple[str, ...]  # the partitions it trains; the others are frozen
  steps_per_epoch: int
  epochs: int
  max_steps: int  # 0: epochs x steps_per_epoch
  batch_size: int  # global, per optimizer step
  accum_steps: int  # micro-batches per step
  samples: int  # samples per epoch (the last step of an epoch may be smaller)
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  seed: int  # the train state's rng
  validates: bool  # validation at every epoch's end, ranking the checkpoints; the best one is the result
  patience: int  # epochs without a better validation before stopping early

  @property
  def stop_step(self) -> int:
    """Where training stops: after `epochs`, or at `max_steps` if that comes first."""
    total = self.steps_per_epoch * self.epochs
    return min(total, self.max_steps) if self.max_steps > 0 else total

  def kind(self, what: str) -> str:
    """A metrics.jsonl kind of this stage: "train", or "stage1/train" for a named stage."""
    return f"{self.name}/{what}" if self.name else what


def epoch_steps(num_samples: int, batch_size: int) -> int:
  """Every sample once per epoch, the last step smaller (padded and masked), as the authors' DataLoader runs."""
  return -(-num_samples // batch_size)


class Task(Protocol):
  """A model with its partitioned parameters, its data, loss and metrics, and the stages that train it."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  graphdef: nnx.GraphDef
  params: dict  # partitioned; a finished stage's trained partitions replace their initial values
  identity: dict  # the frozen weights' {"source", "sha256"}: checkpoints record it, a resume checks it
  metric: str  # what validation maximises
  loss: step_lib.LossFn
  mean_loss: bool  # `loss` returns a micro-batch's mean, not its sum (step.make_loss_and_grads says what changes)

  def stages(self) -> list[Stage]: ...
  def summary_lines(self) -> list[str]: ...
  # Before a stage without checkpoints: config.init_from's parameters put into `params`; what eval.json records.
  def initialize(self, stage: Stage) -> dict | None: ...
  def frozen_shardings(self, frozen: dict): ...
  # What a stage needs beyond its state before its first step (the classifier's prefix caches).
  def start_stage(self, stage: Stage, trained: dict, frozen_shardings) -> None: ...
  # This process's endless training micro-batches of the stage (host dicts; get_state / set_state resume them).
  def train_batches(self, stage: Stage): ...
  # A step's micro-batches -> (the global batch, leading micro-batch axis; samples skipped as corrupt).
  def device_batch(self, micro: list[dict]) -> tuple[object, int]: ...
  # Arrays on the devices that a split's batches refer to ({} for none), which `expand` reads inside the step.
  def device_arrays(self, split: str) -> dict: ...
  def expand(self, batch, device_arrays: dict): ...
  def meta(self) -> dict: ...  # what checkpoints record of the task beside config and backbone identity
  def check_resume(self, meta: dict, where: str) -> None: ...  # refuses a checkpoint of other task data
  def validate(self, trained: dict, frozen: dict) -> dict: ...  # validation metrics, `metric` among them
  # (eval.json's results, the table printed) of the last stage's parameters, those of checkpoint `step`.
  def test(self, trained: dict, step: int, writer, record, train_seconds: float | None) -> tuple[dict, str]: ...


def is_mllm(config: ml_collections.ConfigDict | dict) -> bool:
  return config.get("task") == MLLM


def build(config: ml_collections.ConfigDict, workdir: Path) -> Task:
  """The task of `config`, every check that needs no data or weights done first."""
  # pylint: disable=import-outside-toplevel  (each task imports what only it uses)
  if is_mllm(config):
    from mora_jax.train import answering
    return answering.build(config, workdir)
  from mora_jax.train import classification
  return classification.build(config, workdir)
