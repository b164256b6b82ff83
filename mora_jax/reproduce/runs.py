"""A table's runs on disk: their configs, folders, which datasets are present, and running what is missing.

Each (training, seed) is one train.py run in `<workdir>/<dataset>/<training name>/seed<seed>`; its eval.json says
it is finished, and an unfinished one resumes from its checkpoints (`loop.train`), so a killed table restarts
where it stopped. Runs are shared between tables: a run is its config, not its table. A re-test at another
missing type and rate is eval.py's, in the file eval.py writes (`evaluation.retest_file`).
"""

import dataclasses
import json
import time
from pathlib import Path

import ml_collections

from mora_jax import data, sharding
from mora_jax.backbones import embedded
from mora_jax.train import answering, checkpoint, job, tasks
from mora_jax.train import config as config_lib
from mora_jax.train import evaluation, loop, recipes
from mora_jax.train.job import CONFIG_FILE, EVAL_FILE
from mora_jax.reproduce.tables import ALIGNED, MISMATCHED, MLLM, Measure, Training


WALL_FILE = "wall_seconds.txt"  # seconds of training and testing, summed over the invocations that ran it
# What a finished run may have differed in and still be reused: what a resumed run may change (checkpoint.CHANGEABLE)
# but max_steps, which changes what is trained; and where the embedded backbone (and an MLLM run's LM) is cached.
HOST_KEYS = (*(key for key in checkpoint.CHANGEABLE if key != "max_steps"), "backbone.cache_dir", "lm.cache_dir")
# Keys a table sets per run: overriding them for every run would put runs in the wrong folders and cells.
TABLE_KEYS = {"seed": "--seeds", "dataset": "--rows", "missing.type": "--rows", "missing.rate": "--rows",
              "adapter.method": "--rows", "task": "--rows"}


@dataclasses.dataclass(frozen=True)
class Options:
  """Where runs live and read their data, and what every run's config gets on top of its table's."""
  workdir: Path
  data_dir: str = "data"
  manual_dirs: tuple[tuple[str, str], ...] = ()  # (dataset, folder of its raw download or Arrow files)
  cache_dir: str = "~/.cache/mora_jax"
  overrides: tuple[tuple[str, str], ...] = ()  # --config.KEY=VALUE, for every run

  def manual_dir(self, dataset: str) -> str:
    return dict(self.manual_dirs).get(dataset, "")


def run_dir(options: Options, training: Training, seed: int) -> Path:
  return options.workdir / training.dataset / training.name / f"seed{seed}"


def retest_path(directory: Path, retest: tuple[str, float]) -> Path:
  kind, rate = retest
  return evaluation.retest_file(directory, kind, rate)


def backbone_folder(kind: str, options: Options) -> Path:
  """easy-VQA's study backbones: ALIGNED is the embedded CLIP (seed 0); MISMATCHED its vision tower with the text
  tower of an independent pre-training (seed 1). Their folder, built or not."""
  if kind not in (ALIGNED, MISMATCHED):
    raise ValueError(f"unknown study backbone {kind!r}: use {ALIGNED!r} or {MISMATCHED!r}.")
  name = embedded.directory_name(0) if kind == ALIGNED else embedded.combined_name(0, 1)
  return Path(options.cache_dir).expanduser() / name


def ensure_backbone(kind: str, options: Options) -> Path:
  """The study backbone's folder, built first if it is not there."""
  if kind == MISMATCHED:
    return embedded.ensure_combined(options.cache_dir, options.data_dir, 0, 1)
  return embedded.ensure(options.cache_dir, options.data_dir, seed=0)


def check_overrides(overrides, trainings) -> None:
  """Refuses a --config override of a key the table sets per run (its seed, dataset, missing setting, method, a
  training's own overrides, a study backbone): the runs would land in folders and cells that say otherwise."""
  own = {key: "--rows" for training in trainings for key, _ in training.overrides}
  if any(training.backbone for training in trainings):  # easy-VQA's study backbones
    own["backbone.path"] = "--cache_dir"
  for key, _ in overrides:
    flag = {**TABLE_KEYS, **own}.get(key)
    if flag:
      raise ValueError(f"--config.{key}: the table sets it per run; choose runs with {flag} instead.")


def config_of(training: Training, seed: int, options: Options, build_backbone: bool = True
              ) -> ml_collections.ConfigDict:
  """The run's config: the dataset's recipe for the method (an MLLM run's: recipes.mllm), then the seed, the
  folders, the missing setting, the training's overrides and the command line's. `build_backbone=False`: a study
  backbone's folder is named, not built (to plan)."""
  mllm = training.task == MLLM  # its embedded vision tower and LM are built on first use in cache_dir
  config = recipes.mllm(training.method) if mllm else recipes.get(training.dataset, training.method)
  values = [("seed", seed), ("data_dir", options.data_dir)]
  if training.backbone:
    builder = ensure_backbone if build_backbone else backbone_folder
    values.append(("backbone.path", builder(training.backbone, options)))
  if options.manual_dir(training.dataset) and not mllm:
    values.append(("manual_dir", options.manual_dir(training.dataset)))
  values += [("backbone.cache_dir", options.cache_dir), *([("lm.cache_dir", options.cache_dir)] if mllm else []),
             ("missing.type", training.type), ("missing.rate", training.rate), *training.overrides,
             *options.overrides]
  config_lib.apply_overrides(config, [(key, str(value)) for key, value in values], log=lambda _: None)
  return config


def validate(config: ml_collections.ConfigDict, sources: bool = True) -> None:
  """Every check of the run's config that reads no data or weights: job.validate's (`sources`: the dataset's
  files too), or an MLLM run's answering.check."""
  if not tasks.is_mllm(config):
    job.validate(config, sources=sources)
    return
  answering.check(config)


def _what_is_computed(config: dict) -> dict:
  """`config` (JSON form) without HOST_KEYS; a backbone path by its folder name (backbone.cache_dir may move)."""
  out = json.loads(json.dumps(config))
  for key in HOST_KEYS:
    *sections, leaf = key.split(".")
    node = out
    for section in sections:
      node = node.get(section, {})
    node.pop(leaf, None)
  if out.get("backbone", {}).get("path"):
    out["backbone"]["path"] = Path(out["backbone"]["path"]).name
  return out


def read_json(path: Path) -> dict:
  """A JSON file a run wrote; a cut or hand-broken one is an error naming it."""
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); delete it (or its run folder) to compute it again.") from e


def check_same_run(directory: Path, config: ml_collections.ConfigDict) -> None:
  """Refuses to reuse or resume a run folder that holds another config's run (e.g. one made with other
  --config overrides), which would put its numbers in the wrong cell. Keys added to configs since it ran count
  with their defaults, as when it resumes (checkpoint.saved_config)."""
  path = directory / CONFIG_FILE
  if not path.is_file():
    return
  saved = checkpoint.saved_config({"config": read_json(path)})
  current = json.loads(config_lib.to_json(config))
  changed = config_lib.differences(_what_is_computed(saved), _what_is_computed(current))
  if changed:
    raise ValueError(f"{directory} holds a run of another config ({'; '.join(changed[:3])}"
                     f"{'; ...' if len(changed) > 3 else ''}): pass another --workdir, or delete that folder to "
                     "run it with this one.")


def is_done(options: Options, training: Training, seed: int, retests=()) -> bool:
  """Whether the run has finished and has each of `retests` (this process's view of the files)."""
  directory = run_dir(options, training, seed)
  return (directory / EVAL_FILE).is_file() and all(retest_path(directory, r).is_file() for r in retests)


def train(options: Options, training: Training, seed: int, step_hook=None) -> Path:
  """Trains (or resumes) the run, whose config check_same_run has passed; its folder."""
  directory = run_dir(options, training, seed)
  config = config_of(training, seed, options)
  started = time.perf_counter()
  loop.train(config, directory, step_hook=step_hook)
  add_wall_seconds(directory, time.perf_counter() - started)
  return directory


def add_wall_seconds(directory: Path, seconds: float) -> None:
  if sharding.is_main_process():
    path = directory / WALL_FILE
    before = float(path.read_text()) if path.is_file() else 0.0
    path.write_text(f"{before + seconds:.1f}\n")


def retest(options: Options, training: Training, seed: int, retest_at: tuple[str, float]) -> None:
  """The run's best checkpoint re-tested at another missing (type, rate), as eval.py does and where eval.py
  writes it, with this invocation's data and backbone folders (they may have moved since it trained)."""
  directory = run_dir(options, training, seed)
  kind, rate = retest_at
  moved = [("data_dir", options.data_dir), ("backbone.cache_dir", options.cache_dir)]
  if options.manual_dir(training.dataset):
    moved.append(("manual_dir", options.manual_dir(training.dataset)))
  if training.backbone:
    moved.append(("backbone.path", str(backbone_folder(training.backbone, options))))
  started = time.perf_counter()
  results = evaluation.evaluate_run(directory, missing={"type": kind, "rate": rate}, config_overrides=moved)
  if sharding.is_main_process():
    path = retest_path(directory, retest_at)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(results, indent=2) + "\n")
    partial.replace(path)  # whole or absent: a killed write is not taken for a finished re-test
  add_wall_seconds(directory, time.perf_counter() - started)


def value(options: Options, measure: Measure, seed: int) -> float | None:
  """The measure's number in % for one seed, or None while its run (or re-test) is not done. A metric with dots
  is a path into the scenario's results ("per_question_type.color")."""
  directory = run_dir(options, measure.training, seed)
  path = retest_path(directory, measure.retest) if measure.retest else directory / EVAL_FILE
  if not path.is_file():
    return None
  results = read_json(path)
  metric = measure.metric or results["metric"]
  node = results["test"][measure.scenario]
  for key in metric.split("."):
    if not isinstance(node, dict) or key not in node:  # e.g. a question type absent from a limited test
      raise ValueError(f"{path} has no {metric!r} in its {measure.scenario!r} test results.")
    node = node[key]
  return 100 * node


def wall_seconds(options: Options, training: Training, seed: int) -> float | None:
  path = run_dir(options, training, seed) / WALL_FILE
  return float(path.read_text()) if path.is_file() else None


def absent(dataset: str, options: Options) -> str | None:
  """None if the dataset can be read (easy-VQA always; the others prepared in data_dir, or their manual_dir
  given and not empty), else the one line saying what to download and where."""
  if dataset not in data.BUILDERS:
    raise ValueError(f"unknown dataset {dataset!r}; known: {sorted(data.BUILDERS)}.")
  if dataset == "easy_vqa" or data.is_prepared(dataset, options.data_dir):
    return None
  manual = options.manual_dir(dataset)
  if manual and any(Path(manual).expanduser().iterdir()):
    return None
  where = f"--manual_dir {dataset}={manual} is empty" if manual else "no --manual_dir for it"
  builder = data.BUILDERS[dataset].__name__
  return (f"{dataset}: skipped, not prepared in --data_dir {options.data_dir} and {where}. Download it as "
          f"docs/protocol.md (Datasets) says ({builder}.MANUAL_DOWNLOAD_INSTRUCTIONS in "
          f"mora_jax/data/builders/manual.py) and pass --manual_dir {dataset}=PATH (or --manual_dir ROOT holding "
          f"{dataset}/).")
