"""Orbax checkpoints of a run: trainable parameters, optimizer state, step and RNG ("state"), each process's
data-iterator position ("data"), and the config, backbone identity and loop bookkeeping ("meta") — never
the frozen backbone. Keeps the latest `keep` checkpoints plus the best one by validation metric.

Restores take an abstract target built from the *current* mesh, so a run saved on 8 devices resumes on 2.
"""

import json
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from mora_jax.train import config as config_lib

# Keys a resumed or re-evaluated run may change: where data lives, how it is spread over devices, how
# often it logs and saves, and evaluation batch sizes. Every other key must equal the saved config.
CHANGEABLE = ("data_dir", "manual_dir", "mesh", "data_threads", "log_every_steps", "checkpoint", "max_steps",
              "eval", "skip_corrupt")


class IncompatibleCheckpoint(ValueError):
  """A checkpoint written by another config or over another backbone."""


def _handlers():
  return {"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
          "meta": ocp.JsonCheckpointHandler()}


class Checkpointer:

  def __init__(self, directory: str | Path, keep: int = 2, metric: str | None = None, read_only: bool = False):
    self.directory = Path(directory).absolute()
    policies = [checkpoint_managers.preservation_policy.LatestN(n=keep)]
    if metric is not None:
      # BestN sorts ascending and keeps the last n: the highest value (every metric here is higher-better).
      policies.append(checkpoint_managers.preservation_policy.BestN(
          get_metric_fn=lambda metrics: metrics[metric], n=1, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=True, read_only=read_only, create=not read_only,
        preservation_policy=checkpoint_managers.preservation_policy.AnyPreservationPolicy(policies))
    self.manager = ocp.CheckpointManager(self.directory, item_handlers=_handlers(), options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_iterator, meta: dict, metrics: dict | None = None) -> None:
    """Asynchronous; every process must call it. `metrics` (validation) ranks the best checkpoint."""
    self.manager.wait_until_finished()
    self.manager.save(step, metrics=metrics, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator),
        meta=ocp.args.JsonSave(meta)))

  def meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore_state(self, step: int, abstract_state):
    """`abstract_state`: jax.ShapeDtypeStruct leaves carrying the current mesh's shardings."""
    return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))["state"]

  def restore_data(self, step: int, data_iterator) -> bool:
    """Restores this process's iterator position; False if the checkpoint came from another process count
    (each process saved its own position; the caller then repositions from the step)."""
    if (self.directory / str(step) / "data" / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        ).exists():
      self.manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iterator)))
      return True
    return False

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def check_config(meta: dict, config, where: str) -> None:
  """Refuses a checkpoint written by another config, saying what differs and what to do."""
  saved = {k: v for k, v in meta["config"].items() if k not in CHANGEABLE}
  current = {k: v for k, v in json.loads(config_lib.to_json(config)).items() if k not in CHANGEABLE}
  problems = config_lib.differences(saved, current)
  if problems:
    raise IncompatibleCheckpoint(
        f"{where} holds checkpoints of another config; it differs in: " + "; ".join(problems)
        + ". Use a new --workdir, or the config it was trained with (its config.json).")


def check_backbone(meta: dict, identity: dict, where: str) -> None:
  """Refuses adapters trained over other backbone weights than the ones loaded now."""
  saved = meta["backbone"]
  if saved["sha256"] != identity["sha256"]:
    raise IncompatibleCheckpoint(
        f"{where} holds checkpoints trained over another backbone: {saved['source']} (weights sha256 "
        f"{saved['sha256'][:12]}), but {identity['source']} (sha256 {identity['sha256'][:12]}) is loaded. "
        "Point config.backbone at the original weights, or train in a new --workdir.")
