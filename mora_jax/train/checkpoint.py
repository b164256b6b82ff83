"""Orbax checkpoints of a run: trainable parameters, optimizer state, step and RNG ("state"), each process's
data-iterator position ("data"), and the config, backbone identity and loop bookkeeping ("meta") — never
the frozen backbone. Keeps the latest `keep` checkpoints plus the best one by validation metric.

Restores take an abstract target built from the *current* mesh, so a run saved on 8 devices resumes on 2.
A checkpoint that does not restore (a truncated or deleted file) is skipped for the next one; resuming
moves it to `<directory>/damaged/<step>/`, kept for inspection.
"""

import json
import logging
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from mora_jax import adapters, sharding
from mora_jax.train import config as config_lib
from mora_jax.train import recipes

# Keys a resumed or re-evaluated run may change: where data lives, how it is spread over devices, how
# often it logs and saves, evaluation batch sizes, init_from (which a resumed run does not re-apply) and whether
# and where frozen activations and decoded images are kept, and how many threads and processes decode (the same
# values either way). Every
# other key must equal the saved config.
CHANGEABLE = ("data_dir", "manual_dir", "mesh", "data_threads", "data_workers", "pixel_store", "log_every_steps",
              "checkpoint", "max_steps", "eval", "skip_corrupt", "init_from", "prefix_cache", "prefix_cache_memory_gb",
              "prefix_cache_device_gb")
DAMAGED = "damaged"


class IncompatibleCheckpoint(ValueError):
  """A checkpoint written by another config or over another backbone."""


class NoIntactCheckpoint(ValueError):
  """Every checkpoint tried failed to restore."""


def _handlers():
  return {"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
          "meta": ocp.JsonCheckpointHandler()}


class Checkpointer:

  def __init__(self, directory: str | Path, keep: int = 2, metric: str | None = None, read_only: bool = False):
    self.directory = Path(directory).absolute()
    self.read_only = read_only
    policies = [checkpoint_managers.preservation_policy.LatestN(n=keep)]
    score = None
    if metric is not None:
      # A save without validation carries no value and ranks last; of equal values the earlier step ranks higher,
      # as the loop's record of its best (orbax would keep the later one, and the log would name a deleted step).
      score = lambda metrics: (metrics.get(metric, -math.inf), -metrics.get("step", 0))  # noqa: E731
      # BestN sorts ascending and keeps the last n: the highest value (every metric here is higher-better).
      policies.append(checkpoint_managers.preservation_policy.BestN(
          get_metric_fn=score, n=1, keep_checkpoints_without_metrics=False))
    # best_fn makes orbax write each step's metrics into its folder: the best checkpoint stays known after a
    # restart, to BestN (which would otherwise drop it at the next save) and to `steps_best_first`.
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=True, read_only=read_only, create=not read_only, best_fn=score,
        preservation_policy=checkpoint_managers.preservation_policy.AnyPreservationPolicy(policies))
    self.manager = ocp.CheckpointManager(self.directory, item_handlers=_handlers(), options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def steps_best_first(self, metric: str, best_step: int | None) -> list[int]:
    """`best_step` (the loop's record of its best, if still kept), then the validated steps by `metric`,
    highest first (the earlier of equal ones, as the loop picks), then the steps saved without validation
    (or before metrics were stored with checkpoints), newest first."""
    values = {step: (self.manager.metrics(step) or {}).get(metric) for step in self.all_steps()}
    validated = sorted((step for step, value in values.items() if value is not None),
                       key=lambda step: (-values[step], step))
    ranked = validated + sorted((step for step, value in values.items() if value is None), reverse=True)
    return sorted(ranked, key=lambda step: step != best_step)

  def save(self, step: int, state, data_iterator, meta: dict, metrics: dict | None = None) -> None:
    """Asynchronous; every process must call it. `metrics` (validation) ranks the best checkpoint. A step
    already saved is kept as it is (a preemption right after a periodic save has nothing to add)."""
    if step in self.all_steps():
      return
    self.manager.wait_until_finished()
    self.manager.save(step, metrics={**metrics, "step": step} if metrics else {}, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator),
        meta=ocp.args.JsonSave(meta)))

  def _read(self, step: int, item: str, handler, args):
    """One item of checkpoint `step`, read by this process alone. Orbax's own restore ends in a barrier of every
    process, which a process whose read failed never reaches (a collective mismatch or a hang); `first_intact`
    has the processes agree on the outcome instead."""
    alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(), active_processes={jax.process_index()})
    return ocp.Checkpointer(handler, multiprocessing_options=alone).restore(self.directory / str(step) / item,
                                                                            args=args)

  def meta(self, step: int) -> dict:
    return self._read(step, "meta", ocp.JsonCheckpointHandler(), ocp.args.JsonRestore())

  def restore_state(self, step: int, abstract_state):
    """`abstract_state`: jax.ShapeDtypeStruct leaves carrying the current mesh's shardings."""
    return self._read(step, "state", ocp.StandardCheckpointHandler(), ocp.args.StandardRestore(abstract_state))

  def restore_params(self, step: int, abstract_params):
    """The trained parameters of `step` alone (the state's "params"): all that evaluation needs, whatever
    optimizer state was saved beside them. `abstract_params` as `abstract_state` above."""
    target = {"params": abstract_params}
    return self._read(step, "state", ocp.PyTreeCheckpointHandler(), ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)
    )["params"]

  def restore_data(self, step: int, data_iterator) -> bool:
    """Restores this process's iterator position; False if the checkpoint came from another process count
    (each process saved its own position; the caller then repositions from the step)."""
    if (self.directory / str(step) / "data" / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        ).exists():
      self._read(step, "data", grain.checkpoint.CheckpointHandler(), grain.checkpoint.CheckpointRestore(data_iterator))
      return True
    return False

  def first_intact(self, steps: Sequence[int], restore: Callable[[int], object]):
    """The first of `steps` that `restore(step)` restores on every process: (step, what it returned, the
    failures [(step, error)] of the steps tried before it). A checkpoint of another config or backbone is
    not damaged: its IncompatibleCheckpoint propagates."""
    _drop_failed_restore_reports()
    failures, error = [], None
    for step in steps:
      try:
        result, error = restore(step), None
      except IncompatibleCheckpoint:
        raise
      except Exception as e:  # pylint: disable=broad-except  (a damaged file fails in orbax, tensorstore or json)
        result, error = None, e
      if _on_every_process(error is None):
        return step, result, failures
      failures.append((step, error or RuntimeError("it failed to restore on another process")))
    tried = "; ".join(f"step {step}: {self.describe_failure(step, error)}" for step, error in failures)
    # A read-only one (evaluation, init_from) only reads the run: starting it afresh is not what was asked.
    fix = ("Nothing was moved (they are only read here): restore the damaged files from a copy, or use another run "
           "or checkpoint"
           if self.read_only else "Move that folder away to start this run afresh, or use a new --workdir")
    raise NoIntactCheckpoint(f"no checkpoint in {self.directory} restores ({tried or 'none found'}). {fix}; --debug "
                             "shows why the last one failed.") from error

  def restore_first_intact(self, steps: Sequence[int], restore: Callable[[int], object], *, move_damaged: bool,
                           log: Callable[[str], None]) -> tuple[int, object]:
    """(step, `restore(step)`) of the first of `steps` that restores, logging a warning for each one before it
    that does not (and, with `move_damaged`, moving it to <directory>/damaged/)."""
    step, result, failures = self.first_intact(steps, restore)
    for damaged, error in failures:
      what = self.describe_failure(damaged, error)
      where = f"moved it to {self.move_aside(damaged)}" if move_damaged else "left it in place"
      log(f"warning: checkpoint {self.directory / str(damaged)} does not restore ({what}); {where}; using the "
          f"checkpoint of step {step} instead")
    return step, result

  def restore_first_intact_params(self, steps: Sequence[int], abstract_params, log: Callable[[str], None]):
    """(step, trained parameters) of the first of `steps` whose parameters restore into `abstract_params`
    (`restore_params`), warning of each one before it that does not; damaged ones are left in place."""
    return self.restore_first_intact(steps, lambda step: self.restore_params(step, abstract_params),
                                     move_damaged=False, log=log)

  def describe_failure(self, step: int, error: Exception) -> str:
    """What failed to restore: the file of checkpoint `step` the error names, else the error's first line."""
    files = re.findall(re.escape(str(self.directory / str(step))) + r"/[^\s\"'\\]*[^\s\"'\\.]", str(error))
    if files:
      return max(files, key=len)
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"

  def move_aside(self, step: int) -> Path:
    """Moves the folder of a damaged `step` to <directory>/damaged/<step>[-k] (never deleted, so it can be
    inspected) and stops tracking it."""
    damaged = self.directory / DAMAGED
    target, k = damaged / str(step), 1
    while target.exists():
      target, k = damaged / f"{step}-{k}", k + 1
    if jax.process_index() == 0:
      damaged.mkdir(exist_ok=True)
      (self.directory / str(step)).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"moved aside checkpoint {step}")
    self.manager.reload()
    return target

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def _on_every_process(flag: bool) -> bool:
  return bool(sharding.on_every_process(flag))


def _not_an_unretrieved_future_error(record: logging.LogRecord) -> bool:
  """False for asyncio's report of a failed read nobody awaited (logged when its future is collected)."""
  return not record.getMessage().startswith(("Future exception was never retrieved",
                                             "Task exception was never retrieved"))


def _drop_failed_restore_reports() -> None:
  """A failed restore leaves tensorstore reads in flight. As they finish, during the failure or seconds
  later, they report "Event loop is closed" (with a traceback) into the restore's closed asyncio loop, and
  asyncio logs their errors, with tracebacks, when their futures are collected. These say nothing the
  failure did not, so they are dropped; any other unraisable error or asyncio log record still shows."""
  logging.getLogger("asyncio").addFilter(_not_an_unretrieved_future_error)  # adding it again is a no-op
  previous = sys.unraisablehook
  if getattr(previous, "__name__", "") == "drop_closed_event_loop":
    return

  def drop_closed_event_loop(report):
    if not (isinstance(report.exc_value, RuntimeError) and str(report.exc_value) == "Event loop is closed"):
      previous(report)

  sys.unraisablehook = drop_closed_event_loop


# Multimodal-LLM config keys added after its first runs, with the values that give what those runs computed.
MLLM_BEFORE_KEYS = {"image_tokens": "patches", "stage1": {"data": "captions"}, "questions": "easy_vqa"}


def saved_config(meta: dict) -> dict:
  """The config a checkpoint was saved with (JSON form), the keys added since then given their defaults, so that a
  run of an earlier version resumes and re-tests as it ran: the classifier config's (recipes.base), and the
  adapter method's own fields; a multimodal-LLM run's config, which has a `task` and other keys: its adapter, and
  MLLM_BEFORE_KEYS."""
  saved = meta["config"]
  if "task" not in saved:
    saved = config_lib.fill_absent(saved, json.loads(config_lib.to_json(recipes.base())), skip=("adapter",))
  else:  # a multimodal-LLM run: the keys added since, with the behaviour it had before they existed
    saved = config_lib.fill_absent(saved, MLLM_BEFORE_KEYS)
  try:
    method = adapters.to_config(adapters.from_config(saved["adapter"]))
  except (TypeError, ValueError):  # a field since removed: check_config names the difference
    return saved
  if "task" in saved and "decoder_masks" in method:
    # Added with the default "first_layer" (the authors' visual-text code); decoder runs before it ran every layer's.
    method["decoder_masks"] = "every_layer"
  return {**saved, "adapter": config_lib.fill_absent(saved["adapter"], json.loads(json.dumps(method, default=list)))}


def check_config(meta: dict, config, where: str) -> None:
  """Refuses a checkpoint written by another config, saying what differs and what to do."""
  saved = {k: v for k, v in saved_config(meta).items() if k not in CHANGEABLE}
  current = {k: v for k, v in json.loads(config_lib.to_json(config)).items() if k not in CHANGEABLE}
  problems = config_lib.differences(saved, current)
  if problems:
    raise IncompatibleCheckpoint(
        f"{where} holds checkpoints of another config; it differs in: " + "; ".join(problems)
        + ". Use a new --workdir, or the config it was trained with (its config.json).")


def check_data(meta: dict, data_name: str, where: str) -> None:
  """Refuses to resume on other training data than the checkpoint's: a manifest edited since (a manifest's
  prepared name carries its content hash; a published dataset's is its name, which the config fixes)."""
  saved = meta.get("data", data_name)  # checkpoints written before meta recorded it
  if saved != data_name:
    raise IncompatibleCheckpoint(
        f"{where} holds checkpoints trained on {saved}, but the training data is now {data_name}: the manifest "
        "changed since. Restore the manifest the run was trained on, or train in a new --workdir.")


def check_backbone(meta: dict, identity: dict, where: str) -> None:
  """Refuses adapters trained over other backbone weights than the ones loaded now."""
  saved = meta["backbone"]
  if saved["sha256"] != identity["sha256"]:
    raise IncompatibleCheckpoint(
        f"{where} holds checkpoints trained over another backbone: {saved['source']} (weights sha256 "
        f"{saved['sha256'][:12]}), but {identity['source']} (sha256 {identity['sha256'][:12]}) is loaded. "
        "Point config.backbone at the original weights, or train in a new --workdir.")
