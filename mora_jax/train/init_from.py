"""`config.init_from`: a fresh run's adapters (and head) taken from another run or a PEFT adapter directory.

    config.init_from = "runs/hateful_memes_lora"          # a train.py workdir: its best intact checkpoint
    config.init_from = "runs/x/checkpoints/120"           # one checkpoint step directory
    config.init_from = "exports/peft_lora"                # a PEFT adapter directory (LoRA/DoRA)

A run's adapter must be the one this run builds: same method, targets, towers, start_layer, rank and scale
(dropout, a training setting, may differ); a PEFT adapter must have this run's method, rank and scale, and
adapt only projections this run adapts (those it leaves out keep their init). Anything else is refused,
saying what differs. The head comes along
only from a run with the same class names and head (type, hidden size), or from the head files that
`eval.py --export_peft` writes beside a PEFT adapter (same class names, head type and shapes).
`loop.start` applies it once, to a run without checkpoints of its own: a resumed run keeps its own state.
"""

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mora_jax import adapters, sharding
from mora_jax.adapters import peft as peft_io
from mora_jax.console import say
from mora_jax.data import metrics as metrics_lib
from mora_jax.train import checkpoint as checkpoint_lib
from mora_jax.train import config as config_lib
from mora_jax.train import evaluation, export
from mora_jax.train.job import Job

# How orbax refuses to restore an array of another shape: (this run's shape, the saved one).
_SHAPES = re.compile(r"Requested shape: (\(.*?\)) is not compatible with the stored shape: (\(.*?\))")


def initial_params(job: Job, source: str) -> tuple[dict, dict]:
  """(`job.params` with the adapters, and the head where it fits, of `source`; what eval.json records of it)."""
  path = Path(source).expanduser().absolute()
  if peft_io.is_peft_dir(path):
    clf = adapters.join(job.graphdef, job.params)
    peft_io.load_into(clf, path)
    head = _load_head(clf, job, path)
    _, params = adapters.split(clf)
    say(f"init_from: the adapters{' and head' if head else ''} of the PEFT directory {path}"
        + ("" if head else f" (the head starts fresh: no {export.HEAD_INFO_FILE} of the same classes and head)"))
    return params, {"source": str(path), "kind": "peft", "step": None, "head": head}
  return _from_run(job, path, source)


def check(config, workdir: Path) -> None:
  """config.init_from checked before the backbone, the data or any training, for a run without checkpoints of its
  own (which would not use it): a PEFT directory's config reads, a run's checkpoints exist and trained this run's
  adapter. What needs the weights (shapes, the head's classes) is checked when they are taken."""
  if not config.init_from or any(p.name.isdigit() for p in (workdir / "checkpoints").glob("*")):
    return
  path = Path(config.init_from).expanduser().absolute()
  if peft_io.is_peft_dir(path):
    peft_io.read_config(path)
    return
  directory, step = _checkpoint_dir(path, config.init_from)
  ckpt = checkpoint_lib.Checkpointer(directory, read_only=True)
  try:
    meta = _latest_meta(ckpt, directory, step, config.init_from)
  finally:
    ckpt.close()
  _check_adapter(checkpoint_lib.saved_config(meta)["adapter"], json.loads(config_lib.to_json(config))["adapter"],
                 directory)


def _latest_meta(ckpt: checkpoint_lib.Checkpointer, directory: Path, step: int | None, source: str) -> dict:
  """The meta of the newest readable checkpoint (config and backbone: the same in every one of a run)."""
  steps = ckpt.all_steps()
  if step is not None and step not in steps or not steps:
    raise FileNotFoundError(f"config.init_from={source!r}: {directory} holds no finished checkpoint"
                            + (f" of step {step}" if step is not None else "") + ".")
  return ckpt.first_intact(steps[::-1], ckpt.meta)[1]


def _load_head(clf: adapters.Classifier, job: Job, directory: Path) -> bool:
  """Sets `clf.head` from the head files an export writes beside the adapter (export.write_head), if they hold
  a head of the same classes, type and shapes; whether it did."""
  found = export.read_head(directory)
  if found is None:
    return False
  saved, tensors = found
  variables = {".".join(map(str, path)): variable for path, variable in nnx.to_flat_state(nnx.state(clf.head))}
  if (saved.get("class_names") != list(job.class_names) or saved.get("head") != job.config.head.type
      or {k: v.shape for k, v in tensors.items()} != {k: v.get_value().shape for k, v in variables.items()}):
    return False
  for name, variable in variables.items():
    variable.set_value(jnp.asarray(tensors[name], variable.get_value().dtype))
  return True


def _checkpoint_dir(path: Path, source: str) -> tuple[Path, int | None]:
  """(the checkpoints directory, the step named, or None for the best) of a workdir or a step directory."""
  if (path / "checkpoints").is_dir():
    return path / "checkpoints", None
  if path.name.isdigit() and (path / "state").is_dir():
    return path.parent, int(path.name)
  raise FileNotFoundError(
      f"config.init_from={source!r} is neither a train.py workdir (with checkpoints/), a checkpoint step directory "
      f"(<workdir>/checkpoints/<step>), nor a PEFT adapter directory (with {peft_io.CONFIG_FILE}).")


def _check_adapter(saved: dict, current: dict, where: Path) -> None:
  ignore = lambda values: {k: v for k, v in values.items() if k != "dropout"}  # noqa: E731
  problems = config_lib.differences(ignore(saved), ignore(current), "adapter.")
  if problems:
    raise ValueError(f"config.init_from: {where} trained another adapter; it differs in: " + "; ".join(problems)
                     + ". Set config.adapter as in that run's config.json, or start without init_from.")


def check_shapes(restored, target, where: Path) -> None:
  """Refuses restored parameters whose shapes differ from the run's: orbax restores the saved shapes whatever
  the target says."""
  wrong = [f"{jax.tree_util.keystr(path)} {np.shape(value)} (this run: {want.shape})" for (path, value), want
           in zip(jax.tree_util.tree_flatten_with_path(restored)[0], jax.tree.leaves(target), strict=True)
           if np.shape(value) != want.shape]
  if wrong:
    raise ValueError(f"config.init_from: the parameters of {where} have other shapes than this run's: "
                     + "; ".join(wrong[:5]) + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else "")
                     + ". Was it trained on another backbone architecture? init_from needs the same one.")


def restore_params(ckpt: checkpoint_lib.Checkpointer, candidates: list[int], target, source: str) -> tuple[int, dict]:
  """(step, parameters) of the first of `candidates` whose parameters restore into `target`. None restoring is an
  error naming what failed (`Checkpointer.describe_failure`); the backbone architecture only where the shapes
  differ."""
  try:
    return ckpt.restore_first_intact_params(candidates, target, say)
  except checkpoint_lib.NoIntactCheckpoint as e:
    shapes = _SHAPES.search(str(e.__cause__))
    if shapes is None:
      raise ValueError(f"config.init_from={source!r}: {e}") from e
    raise ValueError(f"config.init_from={source!r}: the parameters of {ckpt.directory} have other shapes than this "
                     f"run's (one is {shapes[2]} where this run's is {shapes[1]}). Was it trained on another backbone "
                     "architecture? init_from needs the same one.") from e


def _from_run(job: Job, path: Path, source: str) -> tuple[dict, dict]:
  directory, step = _checkpoint_dir(path, source)
  ckpt = checkpoint_lib.Checkpointer(directory, read_only=True)
  try:
    meta = _latest_meta(ckpt, directory, step, source)
    # Both as JSON (lists, not tuples).
    saved, current = checkpoint_lib.saved_config(meta), json.loads(config_lib.to_json(job.config))
    _check_adapter(saved["adapter"], current["adapter"], directory)
    if meta["backbone"]["sha256"] != job.backbone.identity["sha256"]:
      say(f"warning: init_from: {directory} was trained over other backbone weights ({meta['backbone']['source']}) "
          f"than this run's ({job.backbone.identity['source']})")
    head = meta.get("class_names") == list(job.class_names) and saved["head"] == current["head"]
    # Every trained partition that holds parameters (adapters; a prompt method's prompts and backbone parts),
    # and the head where it fits.
    target = {k: v for k, v in evaluation.abstract_params(job).items() if (k != "head" or head) and jax.tree.leaves(v)}
    candidates = [step] if step is not None else ckpt.steps_best_first(metrics_lib.primary(saved["dataset"]),
                                                                       meta["loop"]["best_step"])
    step, restored = restore_params(ckpt, candidates, target, source)
  finally:
    ckpt.close()
  say(f"init_from: the adapters{' and head' if head else ''} of {directory / str(step)}"
      + ("" if head else " (the head starts fresh: the classes or the head differ)"))
  check_shapes(restored, target, directory / str(step))
  restored = jax.tree.map(sharding.replicated_value, restored)  # host values, as `loop.start` replicates them
  return {**job.params, **restored}, {"source": str(path), "kind": "run", "step": step, "head": head}
