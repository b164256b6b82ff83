"""The training job and its evaluation: everything `train.py` and `eval.py` run, as library functions.

    results = loop.train(config, workdir)        # trains, validates every epoch, tests the best (merged*)
    results = loop.evaluate_checkpoint(workdir)  # re-tests a finished run, any missing scenario

* MokA, whose cross term depends on the input, is tested unmerged (eval.json says "merged": false).

Multi-host: every process runs the same calls; each reads its own part of the data (Grain shards by
process), global batches are assembled with `jax.make_array_from_process_local_data`, only process 0 prints
and writes logs, and all processes take part in checkpointing.
"""

import dataclasses
import json
import signal
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import safetensors.numpy
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from tqdm import tqdm

from mora_jax import adapters, backbones, data, sharding
from mora_jax.adapters import optim
from mora_jax.data import metrics as metrics_lib
from mora_jax.models import hf
from mora_jax.train import checkpoint as checkpoint_lib
from mora_jax.train import config as config_lib
from mora_jax.train import step as step_lib
from mora_jax.train.writers import MetricWriter

EVAL_FILE = "eval.json"
CONFIG_FILE = "config.json"


class Preempted(Exception):
  """SIGTERM arrived; a checkpoint of `step` was saved and running the same command resumes from it."""

  def __init__(self, step: int, directory: Path):
    super().__init__(f"SIGTERM: saved a checkpoint at step {step} in {directory}; run the same command to resume.")
    self.step = step


class NotWritable(Exception):
  """A folder the run writes to cannot be written."""


def check_writable(directory: Path, flag: str) -> None:
  """Creates `directory` and a temporary file in it, before any work that a failed save would waste. Trying
  is the only reliable test: permission bits say nothing for root, read-only mounts or a file in the way."""
  try:
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=directory):
      pass
  except OSError as e:
    raise NotWritable(f"{directory} is not a writable folder ({e.strerror or e}); free that path or make it "
                      f"writable, or pass another {flag}.") from e


def say(message: str) -> None:
  if sharding.is_main_process():
    tqdm.write(message)


def make_mesh(cfg: ml_collections.ConfigDict) -> tuple[Mesh, tuple]:
  """Mesh ("data", "fsdp") over all devices (data=-1 takes what fsdp leaves), and the backbone's rules:
  FSDP-sharded along "fsdp" when fsdp > 1, replicated otherwise."""
  count = jax.device_count()
  fsdp = cfg.fsdp
  data_size = cfg.data if cfg.data > 0 else count // max(fsdp, 1)
  if fsdp < 1 or data_size * fsdp != count:
    raise ValueError(f"config.mesh data={cfg.data} x fsdp={fsdp} does not cover the {count} devices; "
                     f"use data=-1 with an fsdp that divides {count}.")
  rules = sharding.FSDP_RULES if fsdp > 1 else sharding.REPLICATED_RULES
  return sharding.make_mesh((data_size, fsdp), ("data", "fsdp")), rules


@dataclasses.dataclass
class Job:
  """What a config builds: mesh, backbone, preprocessing, and the classifier split into graph and params."""
  config: ml_collections.ConfigDict
  mesh: Mesh
  rules: tuple
  backbone: backbones.Backbone
  prep: data.Preprocessing
  graphdef: nnx.GraphDef
  params: dict  # adapters.split layout: {"backbone", "adapter": {...}, "head"}
  class_names: tuple[str, ...]
  multi_label: bool

  @property
  def metric(self) -> str:
    return metrics_lib.primary(self.config.dataset)

  def load(self, split: str, missing: data.Missing | None = None) -> data.Dataset:
    return load_split(self.config, split, missing)

  def batches(self, ds: data.Dataset, global_batch: int, train: bool, accum_steps: int = 1):
    per_process, remainder = divmod(global_batch, jax.process_count())
    if remainder:
      raise ValueError(f"batch {global_batch} is not divisible by the {jax.process_count()} processes.")
    return data.batches(ds, per_process, self.backbone.tokenizer, train=train, seed=self.config.seed,
                        prep=self.prep, process_index=jax.process_index(), process_count=jax.process_count(),
                        accum_steps=accum_steps, num_threads=self.config.data_threads,
                        skip_corrupt=self.config.skip_corrupt)


def _check_manual_dir(config: ml_collections.ConfigDict) -> None:
  if config.manual_dir and not Path(config.manual_dir).expanduser().is_dir():
    raise FileNotFoundError(f"config.manual_dir={config.manual_dir!r} does not exist; put the raw "
                            f"{config.dataset} download there (see its MANUAL_DOWNLOAD_INSTRUCTIONS in "
                            "mora_jax/data/builders/manual.py).")


def _main_process_first(prepare, what: str):
  """`prepare()` on process 0, then on the others once it is done: process 0 writes the shared files (in
  data_dir) and the others read them."""
  if jax.process_count() == 1:
    return prepare()
  result = prepare() if sharding.is_main_process() else None
  multihost_utils.sync_global_devices(f"prepared {what}")
  return result if result is not None else prepare()


def load_split(config: ml_collections.ConfigDict, split: str, missing: data.Missing | None = None) -> data.Dataset:
  """One split with its missing table (built, on first use, by process 0)."""
  _check_manual_dir(config)
  return _main_process_first(
      lambda: data.load(config.dataset, split, config.data_dir, config.manual_dir or None,
                        missing or data.Missing(**config.missing), one_sample_per_text=config.one_sample_per_text,
                        log=say), f"{config.dataset}/{split}")


def build(config: ml_collections.ConfigDict) -> Job:
  mesh, rules = make_mesh(config.mesh)
  backbone = backbones.load(config.backbone, config.preprocessing.max_length, config.data_dir, mesh=mesh,
                            rules=rules, log=say)
  prep = data.Preprocessing(image=backbone.image_processing, **config.preprocessing)
  _check_manual_dir(config)
  classes = _main_process_first(
      lambda: data.classes(config.dataset, config.data_dir, config.manual_dir or None, log=say), config.dataset)
  clf = adapters.build_classifier(backbone.model, adapters.from_config(config.adapter.to_dict()),
                                  len(classes.names), classes.multi_label, seed=config.seed,
                                  head=config.head.type, head_hidden=config.head.hidden)
  graphdef, params = adapters.split(clf)
  return Job(config, mesh, rules, backbone, prep, graphdef, params, classes.names, classes.multi_label)


def evaluate(job: Job, eval_step, params, backbone_state, ds: data.Dataset, desc: str) -> dict:
  """Metrics of one pass over `ds` (every sample exactly once; padding and corrupt rows ignored)."""
  batch_size = job.config.eval.batch_size
  target = sharding.batch_sharding(job.mesh, micro_axis=False)
  outputs, corrupt = [], 0
  steps = -(-len(ds.source) // batch_size) if jax.process_count() == 1 else None
  for host_batch in tqdm(job.batches(ds, batch_size, train=False), desc=desc, total=steps, leave=False,
                         disable=not sharding.is_main_process()):
    corrupt += int(np.sum(host_batch["corrupt"]))
    logits = eval_step(params, backbone_state, sharding.global_batch(host_batch, data.MODEL_INPUTS, target, False))
    outputs.append({"logits": sharding.process_rows(logits),
                    **{k: host_batch[k] for k in ("label", "valid", "group")}})
  joined = sharding.gather_rows({k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]})
  valid = joined["valid"].astype(bool)
  result = metrics_lib.summary(job.config.dataset, joined["logits"], joined["label"], valid, job.multi_label,
                               joined["group"], ds.group_names)
  result["samples"] = int(valid.sum())
  result["corrupt_skipped"] = sharding.sum_over_processes(corrupt)
  return result


def _abstract(tree, target: NamedSharding):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=target), tree)


def _summary_lines(job: Job) -> list[str]:
  per = adapters.partition.count(job.params)
  total = sum(per.values())
  lines = [f"parameters: {total:,} in all, {total - per['backbone']:,} trainable "
           f"({100 * (total - per['backbone']) / total:.3f}%)"]
  lines += [f"  {name:<26} {count:>13,}  {100 * count / total:8.3f}%" for name, count in per.items()]
  return lines


class _Sigterm:
  """Records SIGTERM so the loop can save before exiting; all processes agree on it each step."""

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


def _test(job: Job, trainable, scenarios, missing: data.Missing, writer, step: int) -> dict:
  """Test metrics per scenario of the merged model (adapters folded into the backbone), or of the unmerged
  one for a method that cannot be merged (MokA)."""
  clf = adapters.join(job.graphdef, {"backbone": job.params["backbone"], **trainable})
  if adapters.mergeable(clf.adapter):
    clf = adapters.merge(clf)
  graphdef, params = adapters.split(clf)
  backbone_shardings = sharding.state_shardings(params["backbone"], job.mesh, job.rules)
  eval_step = step_lib.make_eval_step(graphdef, job.mesh, backbone_shardings)
  test = job.load("test", missing)
  trainable_params = adapters.trainable(params)
  results = {}
  for kind in scenarios:
    results[kind] = evaluate(job, eval_step, trainable_params, params["backbone"], test.scenario(kind),
                             f"test/{kind}")
    writer.write(step, f"test/{kind}", results[kind])
    if results[kind]["corrupt_skipped"]:
      say(f"warning: test/{kind}: {results[kind]['corrupt_skipped']} samples with a corrupt image were skipped "
          "(skip_corrupt=True); the metrics cover the others")
  return results


def _restore_first_intact(ckpt: checkpoint_lib.Checkpointer, steps, restore, move_damaged: bool):
  """`restore` of the first of `steps` that restores, warning about each one before it that does not (and,
  with `move_damaged`, moving it to <checkpoints>/damaged/)."""
  step, result, failures = ckpt.first_intact(steps, restore)
  for damaged, error in failures:
    what = ckpt.describe_failure(damaged, error)
    where = f"moved it to {ckpt.move_aside(damaged)}" if move_damaged else "left it in place"
    say(f"warning: checkpoint {ckpt.directory / str(damaged)} does not restore ({what}); {where}; using the "
        f"checkpoint of step {step} instead")
  return step, result


def _restore_state(ckpt: checkpoint_lib.Checkpointer, steps, abstract_state) -> tuple[int, dict]:
  """The step and state of the first intact checkpoint of `steps` (the damaged ones are left in place)."""
  return _restore_first_intact(ckpt, steps, lambda step: ckpt.restore_state(step, abstract_state),
                               move_damaged=False)


def format_table(results: dict, metric: str) -> str:
  names = [metric] + sorted({k for r in results.values() for k in r} - {metric, "samples", "corrupt_skipped"})
  lines = ["| scenario | " + " | ".join(names) + " | samples |", "|---" * (len(names) + 2) + "|"]
  for kind, r in results.items():
    lines.append(f"| {kind} | " + " | ".join(f"{100 * r[n]:.2f}" for n in names) + f" | {r['samples']} |")
  return "\n".join(lines)


def train(config: ml_collections.ConfigDict, workdir: str | Path, *, step_hook=None) -> dict:
  """Trains (resuming from `workdir` if it holds checkpoints), then tests the best checkpoint, merged*."""
  workdir = Path(workdir)
  c = config
  check_writable(workdir / "checkpoints", "--workdir")
  if not data.is_prepared(c.dataset, c.data_dir):
    check_writable(Path(c.data_dir).expanduser(), "--config.data_dir")
  job = build(c)
  if c.batch_size % c.accum_steps or (c.batch_size // c.accum_steps) % jax.device_count():
    raise ValueError(f"batch_size={c.batch_size} must split into accum_steps={c.accum_steps} micro-batches "
                     f"whose size divides over the {jax.device_count()} devices.")
  micro_batch = c.batch_size // c.accum_steps
  train_ds, val_ds = job.load("train"), job.load("validation")
  train_samples = len(train_ds.source)
  if train_samples == 0:
    raise ValueError(f"{c.dataset} has no train samples in {c.data_dir}.")
  # Every sample once per epoch, the last step smaller (padded and masked), as the authors' DataLoader runs.
  steps_per_epoch = -(-train_samples // c.batch_size)
  total_steps = steps_per_epoch * c.epochs
  stop_step = min(total_steps, c.max_steps) if c.max_steps > 0 else total_steps

  schedule = step_lib.lr_schedule(c.optim.lr, total_steps, c.optim.warmup_fraction)
  tx = optim.adamw(schedule, c.optim.weight_decay, lr_mults=c.optim.lr_mults.to_dict(),
                   wd_mults=c.optim.wd_mults.to_dict(), b1=c.optim.b1, b2=c.optim.b2, eps=c.optim.eps)
  trainable = adapters.trainable(job.params)
  replicated = NamedSharding(job.mesh, jax.sharding.PartitionSpec())
  state = sharding.replicate({"params": trainable, "opt": tx.init(trainable), "step": jnp.int32(0),
                              "rng": jax.random.PRNGKey(c.seed)}, job.mesh)
  backbone_state = job.params["backbone"]
  backbone_shardings = sharding.state_shardings(backbone_state, job.mesh, job.rules)

  train_iter = iter(job.batches(train_ds, micro_batch, train=True, accum_steps=c.accum_steps))
  ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", c.checkpoint.keep, metric=job.metric)
  loop = {"best_metric": None, "best_step": None, "bad_epochs": 0, "corrupt_skipped": 0}

  def restore(step: int) -> tuple[dict, dict]:
    meta = ckpt.meta(step)
    checkpoint_lib.check_config(meta, c, str(workdir))
    checkpoint_lib.check_backbone(meta, job.backbone.identity, str(workdir))
    restored = ckpt.restore_state(step, _abstract(state, replicated))
    if not ckpt.restore_data(step, train_iter):
      # Saved by another process count: each global batch is the same set of samples whatever the count,
      # so the position is the number of micro-batches consumed.
      train_iter.set_state({"next_index": step * c.accum_steps})
    return meta, restored

  if ckpt.all_steps():
    latest, (saved, state) = _restore_first_intact(ckpt, sorted(ckpt.all_steps(), reverse=True), restore,
                                                   move_damaged=True)
    loop = saved["loop"]
    say(f"resumed from {ckpt.directory / str(latest)} (step {latest})")

  writer = MetricWriter(workdir)
  if sharding.is_main_process():
    (workdir / CONFIG_FILE).write_text(config_lib.to_json(c) + "\n")
  for line in _summary_lines(job):
    say(line)
  say(f"{c.dataset}: {train_samples} train samples, {steps_per_epoch} steps per epoch of {c.batch_size}"
      f" ({c.accum_steps} micro-batches), {total_steps} steps; devices: {jax.device_count()} on "
      f"{jax.process_count()} process(es), mesh {dict(job.mesh.shape)}")

  train_step = step_lib.make_train_step(job.graphdef, tx, schedule, job.multi_label, job.mesh, backbone_shardings)
  eval_step = step_lib.make_eval_step(job.graphdef, job.mesh, backbone_shardings)
  micro_target = sharding.batch_sharding(job.mesh, micro_axis=True)

  def meta() -> dict:
    return {"config": json.loads(config_lib.to_json(c)), "backbone": job.backbone.identity, "loop": loop,
            "process_count": jax.process_count(), "steps_per_epoch": steps_per_epoch}

  def preempt():
    """Saves the current step unless a periodic or end-of-epoch save already holds it, then stops."""
    ckpt.save(step, state, train_iter, meta())
    ckpt.wait()
    raise Preempted(step, ckpt.directory)

  sigterm = _Sigterm()
  step = int(sharding.replicated_value(state["step"]))
  try:
    while step < stop_step and loop["bad_epochs"] < c.eval.patience:
      epoch = step // steps_per_epoch
      epoch_end = min(stop_step, (epoch + 1) * steps_per_epoch)
      bar = tqdm(total=steps_per_epoch, initial=step - epoch * steps_per_epoch, desc=f"epoch {epoch + 1}/{c.epochs}",
                 unit="step", disable=not sharding.is_main_process())
      window_start, window_samples, corrupt = time.perf_counter(), 0, 0
      while step < epoch_end:
        micro = [next(train_iter) for _ in range(c.accum_steps)]
        corrupt += sum(int(np.sum(m["corrupt"])) for m in micro)
        host = {k: np.stack([m[k] for m in micro]) for k in step_lib.TRAIN_KEYS}
        state, metrics = train_step(state, backbone_state,
                                    sharding.global_batch(host, step_lib.TRAIN_KEYS, micro_target, True))
        window_samples += min(c.batch_size, train_samples - (step - epoch * steps_per_epoch) * c.batch_size)
        step += 1
        bar.update(1)
        if step % c.log_every_steps == 0 or step == epoch_end:
          values = {k: float(sharding.replicated_value(v)) for k, v in metrics.items()}
          rate = window_samples / (time.perf_counter() - window_start)
          values["samples_per_s"] = rate
          writer.write(step, "train", values)
          bar.set_postfix(loss=f"{values['loss']:.4f}", samples_s=f"{rate:.0f}")
          window_start, window_samples = time.perf_counter(), 0
        if c.checkpoint.every_steps and step % c.checkpoint.every_steps == 0 and step < epoch_end:
          ckpt.save(step, state, train_iter, meta())
        if step_hook is not None:
          step_hook(step)
        # At an epoch's end, the validation and its save come first: a step saved before them would resume
        # into the next epoch without them.
        if step < epoch_end and sigterm.any_process():
          bar.close()
          preempt()
      bar.close()
      loop["corrupt_skipped"] += sharding.sum_over_processes(corrupt)
      if step % steps_per_epoch == 0:
        val = evaluate(job, eval_step, state["params"], backbone_state, val_ds, "validation")
        writer.write(step, "val", val)
        value = val[job.metric]
        if loop["best_metric"] is None or value > loop["best_metric"]:
          loop.update(best_metric=value, best_step=step, bad_epochs=0)
        else:
          loop["bad_epochs"] += 1
        say(f"epoch {epoch + 1}: validation {job.metric} {100 * value:.2f} (best {100 * loop['best_metric']:.2f} "
            f"at step {loop['best_step']})")
        ckpt.save(step, state, train_iter, meta(), metrics={job.metric: value})
      else:
        ckpt.save(step, state, train_iter, meta())
      if sigterm.any_process():
        preempt()
    ckpt.wait()
  finally:
    sigterm.restore()

  ranked = ckpt.steps_best_first(job.metric, loop["best_step"])
  if ranked[0] == step:
    best = step
  else:
    best, state = _restore_state(ckpt, ranked, _abstract(state, replicated))
  ckpt.close()
  if loop["corrupt_skipped"]:
    say(f"warning: {loop['corrupt_skipped']} training samples had a corrupt image and were skipped")
  results = {"dataset": c.dataset, "method": c.adapter.method, "metric": job.metric, "checkpoint_step": best,
             "best_validation": loop["best_metric"], "missing": c.missing.to_dict(),
             "merged": adapters.mergeable(adapters.from_config(c.adapter.to_dict())),
             "test": _test(job, state["params"], data.SCENARIOS, data.Missing(**c.missing), writer, best),
             "corrupt_skipped_in_training": loop["corrupt_skipped"],
             "parameters": adapters.count_parameters(adapters.join(job.graphdef, job.params))}
  writer.close()
  if sharding.is_main_process():
    (workdir / EVAL_FILE).write_text(json.dumps(results, indent=2) + "\n")
  say(f"test ({c.dataset}, checkpoint of step {best}, {'merged' if results['merged'] else 'unmerged'}; "
      f"missing {c.missing.type} {c.missing.rate}):\n"
      + format_table(results["test"], job.metric) + f"\nwritten to {workdir / EVAL_FILE}")
  return results


def evaluate_checkpoint(workdir: str | Path | None = None, checkpoint: str | Path | None = None,
                        missing: dict | None = None, scenarios=data.SCENARIOS, export_hf: str | Path | None = None,
                        config_overrides=()) -> dict:
  """Re-tests a run: the best intact checkpoint of `workdir` (highest validation metric; a damaged one is
  skipped with a warning, for the next best), or the given checkpoint step directory, with merged weights, on
  any missing type/rate (`missing`: {"type", "rate"} overrides); optionally exports the merged model as a
  Hugging Face CLIP checkpoint plus the head weights."""
  if checkpoint is not None:
    checkpoint = Path(checkpoint).absolute()
    directory, step = checkpoint.parent, int(checkpoint.name) if checkpoint.name.isdigit() else None
    if step is None or not (checkpoint / "state").is_dir():
      raise FileNotFoundError(f"{checkpoint} is not a checkpoint step directory (<workdir>/checkpoints/<step>).")
  else:
    directory, step = Path(workdir).absolute() / "checkpoints", None
  if not directory.is_dir():
    raise FileNotFoundError(f"{directory} does not exist: pass the --workdir of a train.py run.")
  ckpt = checkpoint_lib.Checkpointer(directory, read_only=True)
  steps = ckpt.all_steps()
  if not steps:
    raise FileNotFoundError(f"{directory} holds no finished checkpoint.")
  _, meta, _ = ckpt.first_intact(steps[::-1], ckpt.meta)  # config and backbone: the same in every checkpoint
  config = config_lib.from_json(json.dumps(meta["config"]))
  config_lib.apply_overrides(config, config_overrides)
  for key, value in (missing or {}).items():
    config_lib.override(config, f"missing.{key}", str(value))
  job = build(config)
  checkpoint_lib.check_backbone(meta, job.backbone.identity, str(directory))
  replicated = NamedSharding(job.mesh, jax.sharding.PartitionSpec())
  trainable = adapters.trainable(job.params)
  tx = optim.adamw(0.0, 0.0)
  template = {"params": trainable, "opt": tx.init(trainable), "step": jnp.int32(0), "rng": jax.random.PRNGKey(0)}
  chosen = "the given checkpoint" if step is not None else f"the best intact checkpoint by validation {job.metric}"
  candidates = [step] if step is not None else ckpt.steps_best_first(job.metric, meta["loop"]["best_step"])
  step, state = _restore_state(ckpt, candidates, _abstract(template, replicated))
  ckpt.close()
  say(f"evaluating {directory / str(step)} ({chosen}) on {config.dataset} test, missing {config.missing.type} "
      f"{config.missing.rate}")
  writer = MetricWriter(Path(directory).parent)
  results = {"dataset": config.dataset, "method": config.adapter.method, "metric": job.metric,
             "checkpoint_step": step, "missing": config.missing.to_dict(),
             "merged": adapters.mergeable(adapters.from_config(config.adapter.to_dict())),
             "test": _test(job, state["params"], scenarios, data.Missing(**config.missing), writer, step)}
  writer.close()
  say(format_table(results["test"], job.metric))
  if export_hf is not None:
    export(job, state["params"], export_hf)
  return results


def export(job: Job, trainable, out_dir: str | Path) -> Path:
  """The merged towers as a Hugging Face CLIP checkpoint (config.json, model.safetensors, tokenizer files),
  plus `head.safetensors` and `head.json` (class names, head type). A linear head is `kernel`
  [2 * projection_dim, classes] and `bias`; an MLP head is `hidden.kernel`, `hidden.bias`, `output.kernel`,
  `output.bias` with a GELU (exact) between them."""
  merged = adapters.merge(adapters.join(job.graphdef, {"backbone": job.params["backbone"], **trainable}))
  out = hf.save_pretrained(merged.backbone, out_dir)
  head = {".".join(map(str, path)): sharding.replicated_value(variable.get_value())
          for path, variable in nnx.to_flat_state(nnx.state(merged.head))}
  if sharding.is_main_process():
    job.backbone.tokenizer.save_pretrained(str(out))
    safetensors.numpy.save_file(head, out / "head.safetensors")
    (out / "head.json").write_text(json.dumps({"class_names": list(job.class_names), "multi_label": job.multi_label,
                                               "head": job.config.head.type,
                                               "features": "concat(image_features, text_features)"}, indent=2))
  say(f"exported the merged model to {out}")
  return out
