"""Evaluation: metrics of one pass over a split, the test per missing scenario (merged weights*), re-testing a
finished run from its best intact checkpoint, and exporting the merged model.

    results = evaluation.evaluate_run(workdir)   # what eval.py runs: any missing type and rate, any scenario

* MokA, whose cross term depends on the input, is tested unmerged (eval.json says "merged": false).
"""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mora_jax import adapters, console, data, sharding
from mora_jax.adapters import peft as peft_io
from mora_jax.console import say
from mora_jax.data import metrics as metrics_lib
from mora_jax.data.builders import manifest as manifest_lib
from mora_jax.train import checkpoint as checkpoint_lib
from mora_jax.train import config as config_lib
from mora_jax.train import export as export_lib
from mora_jax.train import prefix_cache
from mora_jax.train import step as step_lib
from mora_jax.train.job import CONFIG_FILE, Job, build_job, validate
from mora_jax.train.writers import MetricWriter


def evaluate_split(job: Job, eval_step, params, backbone_state, ds: data.Dataset, desc: str,
                   cache: prefix_cache.Cache | None = None) -> dict:
  """Metrics of one pass over `ds` (every sample exactly once; padding and corrupt rows ignored), read from the
  split's `cache` if given. Only the model inputs go to the devices; labels and groups stay on the host."""
  batch_size = job.config.eval.batch_size
  target = sharding.batch_sharding(job.mesh, micro_axis=False)
  outputs, corrupt = [], 0
  steps = -(-len(ds.source) // batch_size) if jax.process_count() == 1 else None
  for host_batch in console.bar(job.batches(ds, batch_size, train=False, cache=cache), desc=desc, total=steps,
                                 leave=False):
    corrupt += int(np.sum(host_batch["corrupt"]))
    logits = eval_step(params, backbone_state, sharding.global_arrays(host_batch["inputs"], target, False),
                       cache.device if cache is not None else None)
    outputs.append({"logits": sharding.process_rows(logits),
                    **{k: host_batch[k] for k in ("label", "valid", "group")}})
  joined = sharding.gather_rows({k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]})
  valid = joined["valid"].astype(bool)
  result = metrics_lib.summary(job.config.dataset, joined["logits"], joined["label"], valid, job.multi_label,
                               joined["group"], ds.group_names)
  result["samples"] = int(valid.sum())
  result["corrupt_skipped"] = sharding.sum_over_processes(corrupt)
  return result


def scenario_metrics(job: Job, trainable, scenarios, missing: data.Missing, writer: MetricWriter, step: int) -> dict:
  """Test metrics per scenario of the merged model (adapters folded into the backbone), or of the unmerged
  one for a method that cannot be merged (MokA).

  Where each tower's features depend on its own input only (every method but MokA, MMP and DCP), each tower
  runs once over the present inputs and once over the dummy, and every scenario's samples are assembled from
  those features (prefix_cache's final-features cache, in memory). The others run each scenario; MokA enters
  from the test split's prefix cache unless prefix_cache is off (the prompt methods have no frozen prefix)."""
  clf = adapters.join(job.graphdef, {"backbone": job.params["backbone"], **trainable})
  adapter = clf.adapter
  if adapters.mergeable(adapter):
    clf = adapters.merge(clf)
  graphdef, params = adapters.split(clf)
  merged_job = dataclasses.replace(job, graphdef=graphdef, params=params)
  backbone_shardings = sharding.state_shardings(params["backbone"], job.mesh, job.rules)
  eval_step = step_lib.make_eval_step(graphdef, job.mesh, backbone_shardings, job.prep)
  test = job.load("test", missing)
  trainable_params = adapters.trainable(params)
  if adapter is None or adapter.separable:
    cache = tower_features(merged_job, test, trainable_params, backbone_shardings)
  else:
    cache = prefix_cache.prepare(merged_job, trainable_params, backbone_shardings, {"test": test}, len(scenarios),
                                 log=say).get("test")
  results = {}
  for kind in scenarios:
    results[kind] = evaluate_split(job, eval_step, trainable_params, params["backbone"], test.scenario(kind),
                                   f"test/{kind}", cache)
    writer.write(step, f"test/{kind}", results[kind])
    if results[kind]["corrupt_skipped"]:
      say(f"warning: test/{kind}: {results[kind]['corrupt_skipped']} samples with a corrupt image were skipped "
          "(skip_corrupt=True); the metrics cover the others")
  return results


def tower_features(job: Job, ds: data.Dataset, params, backbone_shardings) -> prefix_cache.Cache:
  """The towers' final features of every sample's present inputs and of the dummy, in host memory, in the prefix
  cache's form: what a test of separable towers assembles each scenario from (they depend on the trained
  weights: never stored)."""
  in_memory = prefix_cache.Plan(None, np.dtype(np.float32), 0.0, Path())
  fill_step = prefix_cache.make_fill_step(job.graphdef, None, job.mesh, backbone_shardings, job.prep)
  return prefix_cache.build(job, ds, params, in_memory, fill_step, memory=True, log=say, desc=f"features {ds.split}")


def abstract_params(job: Job):
  """The trainable parameters' shapes and dtypes, replicated over the job's mesh: a restore target."""
  return sharding.abstract(adapters.trainable(job.params), NamedSharding(job.mesh, PartitionSpec()))


def format_table(results: dict, metric: str) -> str:
  """A markdown table of per-scenario metrics in %: `metric` first, then the others (a nested group, such as
  the MLLM's per_question_type, by its members' names), then the sample count."""
  rows = {kind: _flat(r) for kind, r in results.items()}
  names = [metric] + sorted({k for r in rows.values() for k in r} - {metric, "samples", "corrupt_skipped"})
  lines = ["| scenario | " + " | ".join(names) + " | samples |", "|---" * (len(names) + 2) + "|"]
  for kind, r in rows.items():
    lines.append(f"| {kind} | " + " | ".join(f"{100 * r[n]:.2f}" for n in names) + f" | {r['samples']} |")
  return "\n".join(lines)


def _flat(metrics: dict) -> dict:
  return {k: v for key, value in metrics.items()
          for k, v in (value.items() if isinstance(value, dict) else [(key, value)])}


def config_file_warning(meta: dict, path: Path) -> str | None:
  """A warning line if the run's config.json (`path`) says other than the config saved with its checkpoints, which
  is the one evaluation tests (the model as trained): an edit there changes nothing, and must not look applied."""
  if not path.is_file():
    return None
  try:
    written = json.loads(path.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    written = e
  if not isinstance(written, dict):
    return (f"warning: {path} is cut short or not a JSON object ({written}); evaluation does not need it: it uses "
            "the config saved with the checkpoints.")
  changed = config_lib.differences(meta["config"], written)
  if not changed:
    return None
  return (f"warning: {path} differs from the config saved with the checkpoints (saved -> {CONFIG_FILE}) in: "
          + "; ".join(changed) + ". Evaluation uses the saved one, which the model was trained with; what eval.py "
          "may change, it takes as --config.KEY=VALUE flags.")


def check_classes(meta: dict, manifest: data.Manifest | None, where: Path) -> None:
  """Refuses, before the backbone is built, a manifest whose classes changed since the run trained: its head has
  one output per class of then. (A published dataset's classes are fixed.)"""
  saved = meta.get("class_names")  # None in checkpoints written before meta recorded them
  if manifest is None or saved is None:
    return
  contents = manifest_lib.read(manifest)
  if list(contents.class_names) != saved:
    raise checkpoint_lib.IncompatibleCheckpoint(
        f"{where} holds a head trained on the classes {saved}, but the manifest {contents.path} now gives "
        f"{list(contents.class_names)}: its classes changed since. Restore the labels the run was trained on, or "
        "train a new run on this manifest.")


def retest_file(workdir: str | Path, missing_type: str, rate: float) -> Path:
  """Where eval.py writes a run's re-test at that missing setting (unless --output says otherwise)."""
  return Path(workdir) / f"eval-{missing_type}-{rate}.json"


def evaluate_run(workdir: str | Path | None = None, checkpoint: str | Path | None = None,
                 missing: dict | None = None, scenarios=data.SCENARIOS, export_hf: str | Path | None = None,
                 config_overrides=(), export_peft: str | Path | None = None, test: bool = True) -> dict:
  """Re-tests a run: the best intact checkpoint of `workdir` (highest validation metric; a damaged one is
  skipped with a warning, for the next best), or the given checkpoint step directory, with merged weights, on
  any missing type/rate (`missing`: {"type", "rate"} overrides); optionally exports the merged model for
  transformers (`export_hf`, mora_jax.train.export) and, for LoRA/DoRA, the adapters as a PEFT adapter
  directory (`export_peft`), also without testing (`test=False`: no "test" in the result). Only the trained
  parameters are restored."""
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
  warning = config_file_warning(meta, directory.parent / CONFIG_FILE)
  if warning:
    say(warning)
  config = config_lib.from_json(json.dumps(checkpoint_lib.saved_config(meta)))
  config_lib.apply_overrides(config, config_overrides)
  for key, value in (missing or {}).items():
    config_lib.override(config, f"missing.{key}", str(value))
  settings = validate(config, train=False)
  check_classes(meta, settings.manifest, directory)
  adapter = settings.adapter
  if export_peft is not None:  # before the evaluation that would precede the refusal
    peft_io.check_exportable(adapter)
  if export_hf is not None and not adapters.mergeable(adapter):
    raise ValueError(f"adapter method {config.adapter.method!r} cannot be exported with --export_hf: its update "
                     "depends on the input, so it does not merge into plain CLIP weights. Test it with eval.py "
                     "without --export_hf (unmerged).")
  if not test:  # the export alone: build the job in float32 at once
    config = float32_backbone(config)
    settings = validate(config, train=False)
  job = build_job(config, settings)
  checkpoint_lib.check_backbone(meta, job.backbone.identity, str(directory))
  chosen = "the given checkpoint" if step is not None else f"the best intact checkpoint by validation {job.metric}"
  candidates = [step] if step is not None else ckpt.steps_best_first(job.metric, meta["loop"]["best_step"])
  step, params = ckpt.restore_first_intact_params(candidates, abstract_params(job), say)
  ckpt.close()
  results = {"dataset": config.dataset, "method": config.adapter.method, "adapter": config.adapter.to_dict(),
             "metric": job.metric,
             "checkpoint_step": step, "missing": config.missing.to_dict(),
             "merged": adapters.mergeable(adapter)}
  if test:
    say(f"evaluating {directory / str(step)} ({chosen}) on {config.dataset} test, missing {config.missing.type} "
        f"{config.missing.rate}")
    writer = MetricWriter(Path(directory).parent)
    results["test"] = scenario_metrics(job, params, scenarios, settings.missing, writer, step)
    writer.close()
    say(format_table(results["test"], job.metric))
  if export_hf is not None:
    # The merge in float32: with dtype "auto" on GPU/TPU the tested job's backbone is bfloat16.
    float32 = settings.backbone_dtype == jnp.float32
    tested = (f"checkpoint step {step}, missing {config.missing.type} {config.missing.rate}; metrics in %:\n\n"
              + format_table(results["test"], job.metric)) if test else None
    export_lib.to_hf(job if float32 else build_job(float32_backbone(config)), params, export_hf, tested)
  if export_peft is not None:
    export_peft_adapter(job, params, export_peft)
  return results


def float32_backbone(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with a float32 backbone: the export merges adapters into the weights in full precision."""
  config = config_lib.from_json(config_lib.to_json(config))
  config_lib.override(config, "backbone.dtype", "float32")
  return config


def export_peft_adapter(job: Job, trainable, out_dir: str | Path) -> Path:
  """LoRA/DoRA adapters as a PEFT adapter directory for transformers' CLIPModel of the run's backbone (see
  mora_jax/adapters/peft.py), plus the head as the Hugging Face export writes it (export.write_head)."""
  # This process's local copies: a global array spanning several processes cannot be read into a file.
  host = jax.tree.map(lambda x: jnp.asarray(sharding.replicated_value(x)), trainable)
  clf = adapters.join(job.graphdef, {"backbone": job.params["backbone"], **host})
  out = Path(out_dir)
  if sharding.is_main_process():
    peft_io.save(clf, out, base_model=job.backbone.loadable)
  export_lib.write_head(job, clf.head, out)
  base = job.backbone.loadable or f"the run's {job.backbone.identity['source']} backbone (this library's only)"
  say(f"exported the adapters to {out} (PEFT: peft.PeftModel.from_pretrained(CLIPModel of {base}, {out}))")
  return out
