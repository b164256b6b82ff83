"""The training loop of every task, in named stages: `start_stage` (a stage of a task -> a Run, resumed from
the stage's newest intact checkpoint), `train_epoch`, `validate`, and `test` (the best checkpoint, per missing
scenario). What differs between tasks (the model, its loss, batches and metrics, the list of stages) is the task
object (mora_jax.train.tasks): the CLIP classifier's one stage (mora_jax.train.classification), or the multimodal
LLM's projector alignment then adapter training (mora_jax.train.answering).

    results = loop.train(config, workdir)   # eval.json, metrics.jsonl, tensorboard/ and config.json in workdir

Multi-host: every process runs the same calls on its own part of the data; global batches are assembled with
`jax.make_array_from_process_local_data`; only process 0 prints and writes logs; all take part in
checkpointing, and all agree on a SIGTERM before acting on it.
"""

import dataclasses
import json
import math
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from mora_jax import console, sharding
from mora_jax.adapters import partition
from mora_jax.console import say
from mora_jax.train import checkpoint as checkpoint_lib
from mora_jax.train import config as config_lib
from mora_jax.train import step as step_lib
from mora_jax.train import tasks
from mora_jax.train.job import CONFIG_FILE, EVAL_FILE
from mora_jax.train.tasks import Stage, Task
from mora_jax.train.writers import MetricWriter


class Diverged(ValueError):
  """The training loss is not finite: every later step and checkpoint would hold NaN."""


class Preempted(Exception):
  """SIGTERM arrived; a checkpoint of `step` was saved and running the same command resumes from it."""

  def __init__(self, step: int, directory: Path):
    super().__init__(f"SIGTERM: saved a checkpoint at step {step} in {directory}; run the same command to resume.")
    self.step = step


@dataclasses.dataclass
class Bookkeeping:
  """The loop's record of a stage, saved with every checkpoint (its meta's "loop")."""
  best_metric: float | None = None
  best_step: int | None = None
  bad_epochs: int = 0  # epochs since the best validation (early stopping at the stage's patience)
  corrupt_skipped: int = 0  # training samples skipped for a corrupt image (skip_corrupt=True)
  init_from: dict | None = None  # where config.init_from took the initial parameters from (eval.json records it)


@dataclasses.dataclass
class Run:
  """One stage of a task: its compiled step, data iterator, checkpointer and writer, and the state they advance."""
  task: Task
  stage: Stage
  workdir: Path
  train_step: object
  train_iter: object
  ckpt: checkpoint_lib.Checkpointer
  writer: MetricWriter
  record: Bookkeeping
  step: int = 0
  # The train state {"params": the stage's trained partitions, "opt", "step", "rng"} (replicated) as the flat
  # leaves the train step takes and returns (step.make_train_step_on_leaves), and their structure: `state`
  # assembles it. The frozen partitions (the backbone at least) are `frozen_leaves`.
  state_leaves: list = dataclasses.field(default_factory=list)
  state_treedef: object = None
  frozen_leaves: list = dataclasses.field(default_factory=list)
  frozen: dict = dataclasses.field(default_factory=dict)

  @property
  def state(self) -> dict:
    return jax.tree.unflatten(self.state_treedef, self.state_leaves)

  @state.setter
  def state(self, value: dict) -> None:
    self.state_leaves, self.state_treedef = jax.tree.flatten(value)

  @property
  def config(self) -> ml_collections.ConfigDict:
    return self.task.config

  @property
  def steps_per_epoch(self) -> int:
    return self.stage.steps_per_epoch

  @property
  def stop_step(self) -> int:
    return self.stage.stop_step

  def meta(self) -> dict:
    """What every checkpoint records beside the state: config, backbone identity, the task's data and the loop's
    bookkeeping."""
    return {"config": json.loads(config_lib.to_json(self.config)), "backbone": self.task.identity,
            "loop": dataclasses.asdict(self.record), "process_count": jax.process_count(),
            "steps_per_epoch": self.steps_per_epoch, **self.task.meta()}

  def save(self, metrics: dict | None = None) -> None:
    self.ckpt.save(self.step, self.state, self.train_iter, self.meta(), metrics=metrics)


def start(config: ml_collections.ConfigDict, workdir: Path) -> Run:
  """The config's task built (every check first) and its first stage started."""
  task = tasks.build(config, Path(workdir))
  return start_stage(task, task.stages()[0], Path(workdir))


def start_stage(task: Task, stage: Stage, workdir: Path, writer: MetricWriter | None = None) -> Run:
  """The stage's state (the task's current parameters, or config.init_from's), data, step and checkpointer,
  restored from the stage's newest intact checkpoint if it holds any (a damaged one is moved to damaged/); it
  logs to `writer` (an earlier stage's), or to a new one once the checkpoints are found to be this config's."""
  ckpt = checkpoint_lib.Checkpointer(workdir / stage.directory, task.config.checkpoint.keep,
                                     metric=task.metric if stage.validates else None)
  record = Bookkeeping()
  if not ckpt.all_steps():  # once: a resumed run continues from its own checkpoints
    record.init_from = task.initialize(stage)
  trained = partition.select(task.params, stage.trained)
  frozen = partition.rest(task.params, stage.trained)
  state = sharding.replicate({"params": trained, "opt": stage.tx.init(trained), "step": jnp.int32(0),
                              "rng": jax.random.PRNGKey(stage.seed)}, task.mesh)
  frozen_shardings = task.frozen_shardings(frozen)
  task.start_stage(stage, state["params"], frozen_shardings)
  frozen_leaves, frozen_treedef = jax.tree.flatten(frozen)
  run = Run(task=task, stage=stage, workdir=workdir,
            train_step=step_lib.make_train_step_on_leaves(
                task.graphdef, stage.tx, stage.schedule, task.loss, task.mesh, frozen_shardings,
                jax.tree.structure(state), frozen_treedef, expand=task.expand, mean_loss=task.mean_loss),
            train_iter=task.train_batches(stage), ckpt=ckpt, writer=None, record=record,
            frozen_leaves=frozen_leaves, frozen=frozen)
  run.state = state
  if run.ckpt.all_steps():
    _resume(run)
  run.step = int(sharding.replicated_value(run.state["step"]))
  run.writer = writer or MetricWriter(workdir)
  if sharding.is_main_process():  # once the workdir's checkpoints were found to be this config's
    (workdir / CONFIG_FILE).write_text(config_lib.to_json(task.config) + "\n")
  return run


def _resume(run: Run) -> None:
  ckpt = run.ckpt
  abstract_state = sharding.abstract(run.state, NamedSharding(run.task.mesh, PartitionSpec()))

  def restore(step: int) -> tuple[dict, dict]:
    meta = ckpt.meta(step)
    checkpoint_lib.check_config(meta, run.config, str(run.workdir))
    checkpoint_lib.check_backbone(meta, run.task.identity, str(run.workdir))
    run.task.check_resume(meta, str(run.workdir))
    restored = ckpt.restore_state(step, abstract_state)
    if not ckpt.restore_data(step, run.train_iter):
      # Saved by another process count: each global batch is the same set of samples whatever the count,
      # so the position is the number of micro-batches consumed.
      run.train_iter.set_state({"next_index": step * run.stage.accum_steps})
    return meta, restored

  latest, (meta, run.state) = ckpt.restore_first_intact(sorted(ckpt.all_steps(), reverse=True), restore,
                                                        move_damaged=True, log=say)
  run.record = Bookkeeping(**meta["loop"])
  say(f"resumed from {ckpt.directory / str(latest)} (step {latest})")


# With several processes, how many steps pass between agreements on a SIGTERM: agreeing is a collective that
# waits for the devices, so agreeing every step would stop the host from dispatching ahead of them.
PREEMPTION_CHECK_EVERY = 10


class _Sigterm:
  """Records SIGTERM so the loop can save before exiting; the processes agree on it every PREEMPTION_CHECK_EVERY
  steps and at each epoch's end (a single process acts on it at the next step)."""

  def __init__(self):
    self.requested = False
    self.previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def any_process(self) -> bool:
    if jax.process_count() == 1:
      return self.requested
    return bool(np.any(multihost_utils.process_allgather(np.asarray(self.requested))))

  def restore(self, resend: bool):
    """Puts the previous handler back. With `resend`, a SIGTERM the loop did not act on (it came during the test,
    after the last point where stopping saves anything) goes to that handler now: the finished run's results are
    written, and the caller (a table of runs, a user's script, the default handler) still stops as asked."""
    signal.signal(signal.SIGTERM, self.previous)
    if resend and self.requested:
      signal.raise_signal(signal.SIGTERM)


def _preempt(run: Run):
  """Saves the current step unless a periodic or end-of-epoch save already holds it, then stops."""
  run.save()
  run.ckpt.wait()
  raise Preempted(run.step, run.ckpt.directory)


def advance(run: Run) -> tuple[dict, int]:
  """One optimizer step on the next global batch: (its metrics, still on the devices; the number of samples
  skipped for a corrupt image)."""
  micro = [next(run.train_iter) for _ in range(run.stage.accum_steps)]
  batch, corrupt = run.task.device_batch(micro)
  run.state_leaves, metrics = run.train_step(run.state_leaves, run.frozen_leaves, run.task.device_arrays("train"),
                                             batch)
  run.step += 1
  return metrics, corrupt


def train_epoch(run: Run, sigterm: _Sigterm, step_hook=None) -> None:
  """Steps to the end of the current epoch (or the stage's stop): logging, periodic saves, and a save and stop
  on SIGTERM anywhere but at the epoch's end (where validation and its save come first)."""
  c, stage = run.config, run.stage
  epoch = run.step // run.steps_per_epoch
  epoch_start, epoch_end = epoch * run.steps_per_epoch, min(run.stop_step, (epoch + 1) * run.steps_per_epoch)
  bar = console.bar(total=run.steps_per_epoch, initial=run.step - epoch_start,
                    desc=f"{stage.name + ' ' if stage.name else ''}epoch {epoch + 1}/{stage.epochs}", unit="step")
  window_start, window_samples, corrupt = time.perf_counter(), 0, 0
  while run.step < epoch_end:
    window_samples += min(stage.batch_size, stage.samples - (run.step - epoch_start) * stage.batch_size)
    metrics, skipped = advance(run)
    corrupt += skipped
    bar.update(1)
    if run.step % c.log_every_steps == 0 or run.step == epoch_end:
      values = {k: float(sharding.replicated_value(v)) for k, v in metrics.items()}
      # Checked where the loss comes to the host anyway: a check every step would wait for the devices.
      if not math.isfinite(values["loss"]):
        bar.close()
        raise Diverged(_divergence(run, values["loss"]))
      rate = window_samples / (time.perf_counter() - window_start)
      values["samples_per_s"] = rate
      run.writer.write(run.step, stage.kind("train"), values)
      bar.set_postfix(loss=f"{values['loss']:.4f}", samples_s=f"{rate:.0f}")
      window_start, window_samples = time.perf_counter(), 0
    if c.checkpoint.every_steps and run.step % c.checkpoint.every_steps == 0 and run.step < epoch_end:
      run.save()
    if step_hook is not None:
      step_hook(run.step)
    agree = jax.process_count() == 1 or run.step % PREEMPTION_CHECK_EVERY == 0
    if run.step < epoch_end and agree and sigterm.any_process():
      bar.close()
      _preempt(run)
  bar.close()
  run.record.corrupt_skipped += sharding.sum_over_processes(corrupt)


def _divergence(run: Run, loss: float) -> str:
  """What a non-finite loss says, naming the stage's learning rate: the classifier's one stage reads config.optim,
  each MLLM stage its own section (answering.Answering.stages)."""
  section = run.stage.name or "optim"
  where = f" of {run.stage.name}" if run.stage.name else ""
  return (f"the train loss is {loss} at step {run.step}{where}: training diverged; lower --config.{section}.lr (now "
          f"{run.config[section].lr}).")


def validate(run: Run) -> None:
  """Validation metrics at an epoch's end, the best so far and early stopping's count, and the epoch's save
  (ranked by the metric)."""
  task, record = run.task, run.record
  val = task.validate(run.state["params"], run.frozen)
  run.writer.write(run.step, run.stage.kind("val"), val)
  value = val[task.metric]
  if record.best_metric is None or value > record.best_metric:
    record.best_metric, record.best_step, record.bad_epochs = value, run.step, 0
  else:
    record.bad_epochs += 1
  say(f"{run.stage.name + ' ' if run.stage.name else ''}epoch {run.step // run.steps_per_epoch}: validation "
      f"{task.metric} {100 * value:.2f} (best {100 * record.best_metric:.2f} at step {record.best_step})")
  run.save(metrics={task.metric: value})


def run_stage(run: Run, sigterm: _Sigterm, step_hook=None) -> None:
  """Epochs to the stage's stop (or early stopping): each validated and saved at its end (a stage that does not
  validate saves there), a SIGTERM saving and stopping."""
  while run.step < run.stop_step and run.record.bad_epochs < run.stage.patience:
    train_epoch(run, sigterm, step_hook)
    if run.step % run.steps_per_epoch == 0 and run.stage.validates:
      validate(run)
    else:
      run.save()
    if sigterm.any_process():
      _preempt(run)
  run.ckpt.wait()


def best_params(run: Run) -> tuple[int, dict]:
  """(step, trained parameters) of the stage's best intact checkpoint by validation (the current ones if that is
  this step; the latest where the stage does not validate)."""
  ranked = run.ckpt.steps_best_first(run.task.metric, run.record.best_step)
  if ranked[0] == run.step:
    return run.step, run.state["params"]
  target = sharding.abstract(run.state["params"], NamedSharding(run.task.mesh, PartitionSpec()))
  return run.ckpt.restore_first_intact_params(ranked, target, say)


def test(run: Run, params: dict, step: int, train_seconds: float | None = None) -> dict:
  """`params` (the last stage's trained partitions, of checkpoint `step`) tested per missing scenario by the
  task; eval.json written."""
  if run.record.corrupt_skipped:
    say(f"warning: {run.record.corrupt_skipped} training samples had a corrupt image and were skipped")
  results, table = run.task.test(params, step, run.writer, run.record, train_seconds)
  if sharding.is_main_process():
    (run.workdir / EVAL_FILE).write_text(json.dumps(results, indent=2) + "\n")
  say(f"{table}\nwritten to {run.workdir / EVAL_FILE}")
  return results


def train(config: ml_collections.ConfigDict, workdir: str | Path, *, step_hook=None) -> dict:
  """Builds the config's task, runs its stages (each resuming from its own checkpoints), then tests the last
  stage's best checkpoint. `step_hook(step)`, if given, runs after every step (tests inject faults there)."""
  workdir = Path(workdir)
  task = tasks.build(config, workdir)
  for line in task.summary_lines():
    say(line)
  sigterm = _Sigterm()
  started = time.perf_counter()
  writer, preempted = None, False
  try:
    for stage in task.stages():
      run = start_stage(task, stage, workdir, writer)
      writer = run.writer
      say(f"{stage.name + ': ' if stage.name else ''}{stage.samples} train samples, {run.steps_per_epoch} steps per "
          f"epoch of {stage.batch_size} ({stage.accum_steps} micro-batches), {run.stop_step} steps; devices: "
          f"{jax.device_count()} on {jax.process_count()} process(es), mesh {dict(task.mesh.shape)}")
      run_stage(run, sigterm, step_hook)
      step, params = best_params(run)
      task.params = partition.combine(task.params, params)
      run.ckpt.close()
    return test(run, params, step, round(time.perf_counter() - started, 1))
  except Preempted:
    preempted = True
    raise
  finally:
    if writer is not None:  # also when a stage stops on SIGTERM or an error: its event files are complete
      writer.close()
    sigterm.restore(resend=not preempted)
