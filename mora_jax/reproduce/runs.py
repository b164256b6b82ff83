"""A table's runs on disk: their configs, folders, which datasets are present, and running what is missing.

Each (training, seed) is one train.py run in `<workdir>/<dataset>/<training name>/seed<seed>`; its eval.json says
it is finished, and an unfinished one resumes from its checkpoints (`loop.train`), so a killed table restarts
where it stopped. Runs are shared between tables: a run is its config, not its table. A re-test at another
missing type and rate (eval.py's) is written beside it, in `retests/<type>_<rate>.json`.
"""

import dataclasses
import json
import time
from pathlib import Path

import ml_collections

from mora_jax import data, sharding
from mora_jax.backbones import embedded
from mora_jax.train import config as config_lib
from mora_jax.train import evaluation, loop, recipes
from mora_jax.train.job import CONFIG_FILE, EVAL_FILE
from mora_jax.reproduce.tables import ALIGNED, MISMATCHED, Measure, Training

WALL_FILE = "wall_seconds.txt"
RETESTS = "retests"
# Config keys that say where things are or how the host runs them, not what is computed: a finished run is
# reused whatever they are now.
HOST_KEYS = ("data_dir", "manual_dir", "backbone.cache_dir", "data_threads", "data_workers", "pixel_store",
             "prefix_cache_memory_gb", "prefix_cache_device_gb", "log_every_steps", "checkpoint.every_steps",
             "eval.batch_size")


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


def retest_file(directory: Path, retest: tuple[str, float]) -> Path:
  kind, rate = retest
  return directory / RETESTS / f"{kind}_{rate}.json"


def backbone_folder(kind: str, options: Options) -> Path:
  """easy-VQA's study backbones: ALIGNED is the embedded CLIP (seed 0); MISMATCHED its vision tower with the text
  tower of an independent pre-training (seed 1). Their folder, built or not."""
  cache = Path(options.cache_dir).expanduser()
  if kind == ALIGNED:
    return cache / embedded.directory_name(0)
  if kind != MISMATCHED:
    raise ValueError(f"unknown study backbone {kind!r}: use {ALIGNED!r} or {MISMATCHED!r}.")
  return cache / f"easy_vqa_clip-v{embedded.VERSION}-vision-seed0-text-seed1"


def ensure_backbone(kind: str, options: Options) -> Path:
  """The study backbone's folder, built first if it is not there."""
  aligned = embedded.ensure(options.cache_dir, options.data_dir, seed=0)
  folder = backbone_folder(kind, options)
  if kind == MISMATCHED and not (folder / "towers.json").is_file():
    embedded.combine_towers(aligned, embedded.ensure(options.cache_dir, options.data_dir, seed=1), folder)
  return folder


def config_of(training: Training, seed: int, options: Options, build_backbone: bool = True
              ) -> ml_collections.ConfigDict:
  """The run's config: the dataset's recipe for the method, then the seed, the folders, the missing setting,
  the training's overrides and the command line's. `build_backbone=False`: a study backbone's folder is named,
  not built (to plan)."""
  config = recipes.get(training.dataset, training.method)
  values = [("seed", seed), ("data_dir", options.data_dir)]
  if training.backbone:
    builder = ensure_backbone if build_backbone else backbone_folder
    values.append(("backbone.path", builder(training.backbone, options)))
  if options.manual_dir(training.dataset):
    values.append(("manual_dir", options.manual_dir(training.dataset)))
  values += [("backbone.cache_dir", options.cache_dir), ("missing.type", training.type),
             ("missing.rate", training.rate), *training.overrides, *options.overrides]
  config_lib.apply_overrides(config, [(key, str(value)) for key, value in values], log=lambda _: None)
  return config


def _what_is_computed(config: dict) -> dict:
  """`config` without HOST_KEYS; a backbone path by its folder name (backbone.cache_dir may move)."""
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


def check_same_run(directory: Path, config: ml_collections.ConfigDict) -> None:
  """Refuses to reuse or resume a run folder that holds another config's run (e.g. one made with other
  --config overrides), which would put its numbers in the wrong cell."""
  path = directory / CONFIG_FILE
  if not path.is_file():
    return
  try:
    saved = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); delete {directory} to run it again.") from e
  current = json.loads(config_lib.to_json(config))
  changed = config_lib.differences(_what_is_computed(saved), _what_is_computed(current))
  if changed:
    raise ValueError(f"{directory} holds a run of another config ({'; '.join(changed[:3])}"
                     f"{'; ...' if len(changed) > 3 else ''}): pass another --workdir, or delete that folder to "
                     "run it with this one.")


def is_done(options: Options, training: Training, seed: int) -> bool:
  return (run_dir(options, training, seed) / EVAL_FILE).is_file()


def train(options: Options, training: Training, seed: int, step_hook=None) -> Path:
  """The run, trained (or resumed) unless it has finished; its folder."""
  directory = run_dir(options, training, seed)
  planned = config_of(training, seed, options, build_backbone=False)
  check_same_run(directory, planned)
  if not (directory / EVAL_FILE).is_file():
    config = config_of(training, seed, options)
    started = time.perf_counter()
    loop.train(config, directory, step_hook=step_hook)
    if sharding.is_main_process():
      (directory / WALL_FILE).write_text(f"{time.perf_counter() - started:.1f}\n")
  return directory


def retest(directory: Path, retest_at: tuple[str, float]) -> dict:
  """The run's best checkpoint re-tested at another missing (type, rate), as eval.py does; cached."""
  path = retest_file(directory, retest_at)
  if path.is_file():
    return json.loads(path.read_text())
  kind, rate = retest_at
  results = evaluation.evaluate_run(directory, missing={"type": kind, "rate": rate}, scenarios=("mix",))
  if sharding.is_main_process():
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
  return results


def value(options: Options, measure: Measure, seed: int) -> float | None:
  """The measure's number in % for one seed, or None while its run (or re-test) is not done."""
  directory = run_dir(options, measure.training, seed)
  path = retest_file(directory, measure.retest) if measure.retest else directory / EVAL_FILE
  if not path.is_file():
    return None
  results = json.loads(path.read_text())
  scenario = results["test"][measure.scenario]
  return 100 * scenario[measure.metric or results["metric"]]


def wall_seconds(options: Options, training: Training, seed: int) -> float | None:
  path = run_dir(options, training, seed) / WALL_FILE
  return float(path.read_text()) if path.is_file() else None


def absent(dataset: str, options: Options) -> str | None:
  """None if the dataset can be read (easy-VQA always; the others prepared in data_dir, or their manual_dir
  given and present), else the one line saying what to download and where."""
  if dataset not in data.BUILDERS:
    raise ValueError(f"unknown dataset {dataset!r}; known: {sorted(data.BUILDERS)}.")
  if dataset == "easy_vqa" or data.is_prepared(dataset, options.data_dir):
    return None
  manual = options.manual_dir(dataset)
  if manual and Path(manual).expanduser().is_dir() and any(Path(manual).expanduser().iterdir()):
    return None
  where = (f"--manual_dir {dataset}={manual} is {'empty' if Path(manual).expanduser().is_dir() else 'absent'}"
           if manual else "no --manual_dir for it")
  builder = data.BUILDERS[dataset].__name__
  return (f"{dataset}: skipped, not prepared in --data_dir {options.data_dir} and {where}. Download it as "
          f"docs/protocol.md (Datasets) says ({builder}.MANUAL_DOWNLOAD_INSTRUCTIONS in "
          f"mora_jax/data/builders/manual.py) and pass --manual_dir {dataset}=PATH (or --manual_dir ROOT holding "
          f"{dataset}/).")
