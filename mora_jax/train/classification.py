"""The classification task: a CLIP classifier (adapters or prompts on frozen towers, and a head) trained in one
stage on a dataset's train split, validated every epoch, tested per missing scenario with merged weights*.

* MokA, whose cross term depends on the input, is tested unmerged (eval.json says "merged": false).
"""

import dataclasses
from pathlib import Path

import jax
import numpy as np

from mora_jax import adapters, data, sharding
from mora_jax.adapters import optim, partition
from mora_jax.backbones import embedded
from mora_jax.console import say
from mora_jax.train import checkpoint as checkpoint_lib
from mora_jax.train import evaluation, init_from, prefix_cache
from mora_jax.train import job as job_lib
from mora_jax.train import step as step_lib
from mora_jax.train.job import Job, check_writable
from mora_jax.train.tasks import Stage, epoch_steps


@dataclasses.dataclass(kw_only=True)
class Classification(Job):
  """A Job's classifier with its train and validation splits and their prefix caches (mora_jax.train.tasks.Task)."""
  train_ds: data.Dataset
  val_ds: data.Dataset
  caches: dict = dataclasses.field(default_factory=dict)  # split -> prefix_cache.Cache ({}: the cache is off)
  eval_step: object = None
  mean_loss = False

  @property
  def identity(self) -> dict:
    return self.backbone.identity

  @property
  def loss(self):
    return step_lib.classifier_loss(self.multi_label, self.prep)

  def stages(self) -> list[Stage]:
    c = self.config
    steps_per_epoch = epoch_steps(len(self.train_ds.source), c.batch_size)
    schedule = step_lib.lr_schedule(c.optim.lr, steps_per_epoch * c.epochs, c.optim.warmup_fraction, c.optim.decay)
    tx = optim.adamw(schedule, c.optim.weight_decay, lr_mults=c.optim.lr_mults.to_dict(),
                     wd_mults=c.optim.wd_mults.to_dict(), b1=c.optim.b1, b2=c.optim.b2, eps=c.optim.eps)
    return [Stage(name="", directory="checkpoints", trained=partition.CLASSIFIER[1:], steps_per_epoch=steps_per_epoch,
                  epochs=c.epochs, max_steps=c.max_steps, batch_size=c.batch_size, accum_steps=c.accum_steps,
                  samples=len(self.train_ds.source), tx=tx, schedule=schedule, seed=c.seed, validates=True,
                  patience=c.eval.patience)]

  def summary_lines(self) -> list[str]:
    return job_lib.summary_lines(self)

  def initialize(self, stage: Stage) -> dict | None:
    del stage
    if not self.config.init_from:
      return None
    self.params, record = init_from.initial_params(self, self.config.init_from)
    return record

  def frozen_shardings(self, frozen: dict):
    return {"backbone": sharding.state_shardings(frozen["backbone"], self.mesh, self.rules)}

  def start_stage(self, stage: Stage, trained: dict, frozen_shardings) -> None:
    uses = stage.stop_step / stage.steps_per_epoch
    self.caches = prefix_cache.prepare(self, trained, frozen_shardings["backbone"],
                                       {"train": self.train_ds, "validation": self.val_ds}, uses=uses, log=say)
    self.eval_step = step_lib.make_eval_step(self.graphdef, self.mesh, frozen_shardings["backbone"], self.prep)

  def train_batches(self, stage: Stage):
    return iter(self.batches(self.train_ds, stage.batch_size // stage.accum_steps, train=True,
                             accum_steps=stage.accum_steps, cache=self.caches.get("train")))

  def device_batch(self, micro: list[dict]) -> tuple[dict, int]:
    keys = ("inputs", *step_lib.TARGET_KEYS)
    host = jax.tree.map(lambda *parts: np.stack(parts), *[{k: m[k] for k in keys} for m in micro])
    target = sharding.batch_sharding(self.mesh, micro_axis=True)
    return sharding.global_arrays(host, target, True), sum(int(np.sum(m["corrupt"])) for m in micro)

  def device_arrays(self, split: str):
    """The split's prefix cache on the devices (an inputs.Prefix or inputs.Features), or {} for none."""
    cache = self.caches.get(split)
    return cache.device if cache is not None and cache.device is not None else {}

  @staticmethod
  def expand(batch: dict, device_arrays) -> dict:
    return {**batch, "inputs": prefix_cache.gather(batch["inputs"], device_arrays)}

  def meta(self) -> dict:
    return {"data": self.train_ds.name,
            "class_names": list(self.class_names)}  # whether another run's init_from may take the head

  def check_resume(self, meta: dict, where: str) -> None:
    checkpoint_lib.check_data(meta, self.train_ds.name, where)

  def validate(self, trained: dict, frozen: dict) -> dict:
    return evaluation.evaluate_split(self, self.eval_step, trained, frozen["backbone"], self.val_ds, "validation",
                                     self.caches.get("validation"))

  def test(self, trained: dict, step: int, writer, record, train_seconds: float | None) -> tuple[dict, str]:
    del train_seconds  # the classifier's eval.json has none (metrics.jsonl has the rates)
    c, job = self.config, self
    results = {"dataset": c.dataset, "method": c.adapter.method, "adapter": c.adapter.to_dict(), "metric": job.metric,
               "checkpoint_step": step, "best_validation": record.best_metric, "missing": c.missing.to_dict(),
               "merged": adapters.mergeable(job.settings.adapter),
               "test": evaluation.scenario_metrics(job, trained, data.SCENARIOS, job.settings.missing, writer, step),
               "corrupt_skipped_in_training": record.corrupt_skipped, "init_from": record.init_from,
               "parameters": adapters.count_parameters(adapters.join(job.graphdef, job.params))}
    table = (f"test ({c.dataset}, checkpoint of step {step}, {'merged' if results['merged'] else 'unmerged'}; "
             f"missing {c.missing.type} {c.missing.rate}):\n" + evaluation.format_table(results["test"], job.metric))
    return results, table


def build(config, workdir: Path) -> Classification:
  """Checks the config and the folders, then builds the job and reads its train and validation splits."""
  c = config
  settings = job_lib.validate(c)
  init_from.check(c, workdir)
  check_writable(workdir / "checkpoints", "--workdir")
  if not data.is_prepared(c.dataset, c.data_dir, settings.manifest):
    check_writable(Path(c.data_dir).expanduser(), "--config.data_dir")
  job_lib.check_embedded_cache(c.backbone, embedded, "backbone")
  job = job_lib.build_job(c, settings)
  train_ds = job.load("train")
  if len(train_ds.source) == 0:
    raise ValueError(f"{c.dataset} has no train samples in {c.data_dir}.")
  job_lib.check_batch_size("batch_size", c.batch_size, len(train_ds.source), f"{c.dataset}/train")
  val_ds = job.load("validation")
  return Classification(**{f.name: getattr(job, f.name) for f in dataclasses.fields(Job)}, train_ds=train_ds,
                        val_ds=val_ds)
