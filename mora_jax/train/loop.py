"""The training loop, in named stages: `start` (config -> a Run, resumed from the workdir's newest intact
checkpoint), `train_epoch`, `validate`, and `test` (the best checkpoint, merged*, per missing scenario).

    results = loop.train(config, workdir)   # eval.json, metrics.jsonl, tensorboard/ and config.json in workdir

* MokA, whose cross term depends on the input, is tested unmerged (eval.json says "merged": false).

Multi-host: every process runs the same calls on its own part of the data; global batches are assembled with
`jax.make_array_from_process_local_data`; only process 0 prints and writes logs; all take part in
checkpointing, and all agree on a SIGTERM before acting on it.
"""

import dataclasses
import json
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from mora_jax import adapters, data, progress, sharding
from mora_jax.adapters import optim
from mora_jax.train import checkpoint as checkpoint_lib
from mora_jax.train import config as config_lib
from mora_jax.train import evaluation
from mora_jax.train import init_from
from mora_jax.train import job as job_lib
from mora_jax.train import prefix_cache
from mora_jax.train import step as step_lib
from mora_jax.train.job import CONFIG_FILE, EVAL_FILE, Job, build_job, check_writable, manifest, say, summary_lines
from mora_jax.train.writers import MetricWriter


class Preempted(Exception):
  """SIGTERM arrived; a checkpoint of `step` was saved and running the same command resumes from it."""

  def __init__(self, step: int, directory: Path):
    super().__init__(f"SIGTERM: saved a checkpoint at step {step} in {directory}; run the same command to resume.")
    self.step = step


@dataclasses.dataclass
class Progress:
  """The loop's bookkeeping, saved with every checkpoint (its meta's "loop")."""
  best_metric: float | None = None
  best_step: int | None = None
  bad_epochs: int = 0  # epochs since the best validation (early stopping at config.eval.patience)
  corrupt_skipped: int = 0  # training samples skipped for a corrupt image (skip_corrupt=True)
  init_from: dict | None = None  # where config.init_from took the initial parameters from (eval.json records it)


@dataclasses.dataclass
class Run:
  """One training run: its job, data, compiled steps, checkpointer and writer, and the state they advance."""
  job: Job
  workdir: Path
  train_ds: data.Dataset
  val_ds: data.Dataset
  train_step: object
  eval_step: object
  train_iter: object
  ckpt: checkpoint_lib.Checkpointer
  writer: MetricWriter
  progress: Progress
  caches: dict  # split -> prefix_cache.Cache of the frozen activations ({}: the cache is off)
  step: int = 0
  # The train state {"params": trainable, "opt", "step", "rng"} (replicated) as the flat leaves the train step
  # takes and returns (step.make_train_step_on_leaves), and their structure: `state` assembles it.
  state_leaves: list = dataclasses.field(default_factory=list)
  state_treedef: object = None
  backbone_leaves: list = dataclasses.field(default_factory=list)

  @property
  def state(self) -> dict:
    return jax.tree.unflatten(self.state_treedef, self.state_leaves)

  @state.setter
  def state(self, value: dict) -> None:
    self.state_leaves, self.state_treedef = jax.tree.flatten(value)

  @property
  def config(self) -> ml_collections.ConfigDict:
    return self.job.config

  def device_cache(self, split: str) -> dict:
    """The activations of `split`'s prefix cache when they live on the devices, else {} (what the steps take)."""
    cache = self.caches.get(split)
    return cache.device if cache is not None and cache.device is not None else {}

  @property
  def steps_per_epoch(self) -> int:
    return epoch_steps(len(self.train_ds.source), self.config.batch_size)

  @property
  def total_steps(self) -> int:
    return self.steps_per_epoch * self.config.epochs

  @property
  def stop_step(self) -> int:
    return stop_step(self.config, self.steps_per_epoch)

  @property
  def backbone_state(self):
    return self.job.params["backbone"]

  def meta(self) -> dict:
    """What every checkpoint records beside the state: config, backbone identity and the loop's progress."""
    return {"config": json.loads(config_lib.to_json(self.config)), "backbone": self.job.backbone.identity,
            "data": self.train_ds.name,
            "loop": dataclasses.asdict(self.progress), "process_count": jax.process_count(),
            "class_names": list(self.job.class_names),  # whether another run's init_from may take the head
            "steps_per_epoch": self.steps_per_epoch}

  def save(self, metrics: dict | None = None) -> None:
    self.ckpt.save(self.step, self.state, self.train_iter, self.meta(), metrics=metrics)


def epoch_steps(num_samples: int, batch_size: int) -> int:
  """Every sample once per epoch, the last step smaller (padded and masked), as the authors' DataLoader runs."""
  return -(-num_samples // batch_size)


def stop_step(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """Where training stops: after `epochs`, or at `max_steps` if that comes first."""
  total = steps_per_epoch * config.epochs
  return min(total, config.max_steps) if config.max_steps > 0 else total


def start(config: ml_collections.ConfigDict, workdir: Path) -> Run:
  """Checks the config and the folders, builds the job, its data and steps, and restores the newest intact
  checkpoint of `workdir` if it holds any (a damaged one is moved to checkpoints/damaged/)."""
  c = config
  job_lib.validate(c)
  check_writable(workdir / "checkpoints", "--workdir")
  if not data.is_prepared(c.dataset, c.data_dir, manifest(c)):
    check_writable(Path(c.data_dir).expanduser(), "--config.data_dir")
  job = build_job(c)
  train_ds, val_ds = job.load("train"), job.load("validation")
  if len(train_ds.source) == 0:
    raise ValueError(f"{c.dataset} has no train samples in {c.data_dir}.")
  steps_per_epoch = epoch_steps(len(train_ds.source), c.batch_size)
  schedule = step_lib.lr_schedule(c.optim.lr, steps_per_epoch * c.epochs, c.optim.warmup_fraction, c.optim.decay)
  tx = optim.adamw(schedule, c.optim.weight_decay, lr_mults=c.optim.lr_mults.to_dict(),
                   wd_mults=c.optim.wd_mults.to_dict(), b1=c.optim.b1, b2=c.optim.b2, eps=c.optim.eps)
  ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", c.checkpoint.keep, metric=job.metric)
  progress = Progress()
  if c.init_from and not ckpt.all_steps():  # once: a resumed run continues from its own checkpoints
    job.params, progress.init_from = init_from.initial_params(job, c.init_from)
  trainable = adapters.trainable(job.params)
  state = sharding.replicate({"params": trainable, "opt": tx.init(trainable), "step": jnp.int32(0),
                              "rng": jax.random.PRNGKey(c.seed)}, job.mesh)
  backbone_shardings = sharding.state_shardings(job.params["backbone"], job.mesh, job.rules)
  caches = prefix_cache.prepare(job, state["params"], backbone_shardings, {"train": train_ds, "validation": val_ds},
                                uses=stop_step(c, steps_per_epoch) / steps_per_epoch, log=say)
  backbone_leaves, backbone_treedef = jax.tree.flatten(job.params["backbone"])
  run = Run(job=job, workdir=workdir, train_ds=train_ds, val_ds=val_ds,
            train_step=step_lib.make_train_step_on_leaves(job.graphdef, tx, schedule, job.multi_label, job.mesh,
                                                          backbone_shardings, job.prep, jax.tree.structure(state),
                                                          backbone_treedef),
            eval_step=step_lib.make_eval_step(job.graphdef, job.mesh, backbone_shardings, job.prep),
            train_iter=iter(job.batches(train_ds, c.batch_size // c.accum_steps, train=True,
                                        accum_steps=c.accum_steps, cache=caches.get("train"))),
            ckpt=ckpt, writer=None, progress=progress, caches=caches, backbone_leaves=backbone_leaves)
  run.state = state
  if run.ckpt.all_steps():
    _resume(run)
  run.step = int(sharding.replicated_value(run.state["step"]))
  run.writer = MetricWriter(workdir)
  if sharding.is_main_process():
    (workdir / CONFIG_FILE).write_text(config_lib.to_json(c) + "\n")
  return run


def _resume(run: Run) -> None:
  c, ckpt = run.config, run.ckpt
  abstract_state = sharding.abstract(run.state, NamedSharding(run.job.mesh, PartitionSpec()))

  def restore(step: int) -> tuple[dict, dict]:
    meta = ckpt.meta(step)
    checkpoint_lib.check_config(meta, c, str(run.workdir))
    checkpoint_lib.check_backbone(meta, run.job.backbone.identity, str(run.workdir))
    checkpoint_lib.check_data(meta, run.train_ds.name, str(run.workdir))
    restored = ckpt.restore_state(step, abstract_state)
    if not ckpt.restore_data(step, run.train_iter):
      # Saved by another process count: each global batch is the same set of samples whatever the count,
      # so the position is the number of micro-batches consumed.
      run.train_iter.set_state({"next_index": step * c.accum_steps})
    return meta, restored

  latest, (meta, run.state) = ckpt.restore_first_intact(sorted(ckpt.all_steps(), reverse=True), restore,
                                                        move_damaged=True, log=say)
  run.progress = Progress(**meta["loop"])
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

  def restore(self):
    signal.signal(signal.SIGTERM, self.previous)


def _preempt(run: Run):
  """Saves the current step unless a periodic or end-of-epoch save already holds it, then stops."""
  run.save()
  run.ckpt.wait()
  raise Preempted(run.step, run.ckpt.directory)


def advance(run: Run) -> tuple[dict, int]:
  """One optimizer step on the next global batch: (its metrics, still on the devices; the number of samples
  skipped for a corrupt image)."""
  micro = [next(run.train_iter) for _ in range(run.config.accum_steps)]
  keys = step_lib.input_keys(micro[0]) + step_lib.TARGET_KEYS
  host = {k: np.stack([m[k] for m in micro]) for k in keys}
  target = sharding.batch_sharding(run.job.mesh, micro_axis=True)
  run.state_leaves, metrics = run.train_step(run.state_leaves, run.backbone_leaves, run.device_cache("train"),
                                             sharding.global_batch(host, keys, target, True))
  run.step += 1
  return metrics, sum(int(np.sum(m["corrupt"])) for m in micro)


def train_epoch(run: Run, sigterm: _Sigterm, step_hook=None) -> None:
  """Steps to the end of the current epoch (or config.max_steps): logging, periodic saves, and a save and stop
  on SIGTERM anywhere but at the epoch's end (where validation and its save come first)."""
  c = run.config
  samples = len(run.train_ds.source)
  epoch = run.step // run.steps_per_epoch
  epoch_start, epoch_end = epoch * run.steps_per_epoch, min(run.stop_step, (epoch + 1) * run.steps_per_epoch)
  bar = progress.bar(total=run.steps_per_epoch, initial=run.step - epoch_start,
                     desc=f"epoch {epoch + 1}/{c.epochs}", unit="step")
  window_start, window_samples, corrupt = time.perf_counter(), 0, 0
  while run.step < epoch_end:
    window_samples += min(c.batch_size, samples - (run.step - epoch_start) * c.batch_size)
    metrics, skipped = advance(run)
    corrupt += skipped
    bar.update(1)
    if run.step % c.log_every_steps == 0 or run.step == epoch_end:
      values = {k: float(sharding.replicated_value(v)) for k, v in metrics.items()}
      rate = window_samples / (time.perf_counter() - window_start)
      values["samples_per_s"] = rate
      run.writer.write(run.step, "train", values)
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
  run.progress.corrupt_skipped += sharding.sum_over_processes(corrupt)


def validate(run: Run) -> None:
  """Validation metrics at an epoch's end, the best so far and early stopping's count, and the epoch's save
  (ranked by the metric)."""
  job, progress = run.job, run.progress
  val = evaluation.evaluate_split(job, run.eval_step, run.state["params"], run.backbone_state, run.val_ds,
                                  "validation", run.caches.get("validation"))
  run.writer.write(run.step, "val", val)
  value = val[job.metric]
  if progress.best_metric is None or value > progress.best_metric:
    progress.best_metric, progress.best_step, progress.bad_epochs = value, run.step, 0
  else:
    progress.bad_epochs += 1
  say(f"epoch {run.step // run.steps_per_epoch}: validation {job.metric} {100 * value:.2f} (best "
      f"{100 * progress.best_metric:.2f} at step {progress.best_step})")
  run.save(metrics={job.metric: value})


def test(run: Run) -> dict:
  """The best intact checkpoint's parameters (the current ones if that is this step) tested per missing
  scenario; eval.json written."""
  c, job, progress = run.config, run.job, run.progress
  ranked = run.ckpt.steps_best_first(job.metric, progress.best_step)
  if ranked[0] == run.step:
    best, params = run.step, run.state["params"]
  else:
    best, params = evaluation.restore_best_params(run.ckpt, job, ranked)
  run.ckpt.close()
  if progress.corrupt_skipped:
    say(f"warning: {progress.corrupt_skipped} training samples had a corrupt image and were skipped")
  results = {"dataset": c.dataset, "method": c.adapter.method, "adapter": c.adapter.to_dict(), "metric": job.metric,
             "checkpoint_step": best, "best_validation": progress.best_metric, "missing": c.missing.to_dict(),
             "merged": adapters.mergeable(adapters.from_config(c.adapter.to_dict())),
             "test": evaluation.scenario_metrics(job, params, data.SCENARIOS, data.Missing(**c.missing), run.writer,
                                                 best),
             "corrupt_skipped_in_training": progress.corrupt_skipped, "init_from": progress.init_from,
             "parameters": adapters.count_parameters(adapters.join(job.graphdef, job.params))}
  run.writer.close()
  if sharding.is_main_process():
    (run.workdir / EVAL_FILE).write_text(json.dumps(results, indent=2) + "\n")
  say(f"test ({c.dataset}, checkpoint of step {best}, {'merged' if results['merged'] else 'unmerged'}; "
      f"missing {c.missing.type} {c.missing.rate}):\n"
      + evaluation.format_table(results["test"], job.metric) + f"\nwritten to {run.workdir / EVAL_FILE}")
  return results


def train(config: ml_collections.ConfigDict, workdir: str | Path, *, step_hook=None) -> dict:
  """Trains (resuming from `workdir` if it holds checkpoints), then tests the best checkpoint, merged*.
  `step_hook(step)`, if given, runs after every step (tests inject faults there)."""
  run = start(config, Path(workdir))
  c = run.config
  for line in summary_lines(run.job):
    say(line)
  say(f"{c.dataset}: {len(run.train_ds.source)} train samples, {run.steps_per_epoch} steps per epoch of "
      f"{c.batch_size} ({c.accum_steps} micro-batches), {run.total_steps} steps; devices: {jax.device_count()} on "
      f"{jax.process_count()} process(es), mesh {dict(run.job.mesh.shape)}")
  sigterm = _Sigterm()
  try:
    while run.step < run.stop_step and run.progress.bad_epochs < c.eval.patience:
      train_epoch(run, sigterm, step_hook)
      if run.step % run.steps_per_epoch == 0:
        validate(run)
      else:
        run.save()
      if sigterm.any_process():
        _preempt(run)
    run.ckpt.wait()
  finally:
    sigterm.restore()
  return test(run)
