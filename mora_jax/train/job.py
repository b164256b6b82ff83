"""What a run config builds before any training or evaluation: the device mesh, the frozen backbone, the
preprocessing, the classifier (graph and params), and the data splits with their missing tables.

Multi-host: every process runs the same calls; each reads its own part of the data (Grain shards by process);
only process 0 prints and prepares the shared files, which the others read once it is done.
"""

import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path

import jax
import ml_collections
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from mora_jax import adapters, backbones, data, sharding
from mora_jax.adapters.classifier import HEADS
from mora_jax.console import say
from mora_jax.data import metrics as metrics_lib
from mora_jax.data import pixel_store as pixel_store_lib
from mora_jax.data.datasets import check_source
from mora_jax.train import config as config_lib
from mora_jax.train import prefix_cache
from mora_jax.train import step as step_lib

CONFIG_FILE = "config.json"  # in the workdir: the run's config, as JSON
EVAL_FILE = "eval.json"  # in the workdir: the test results


class NotWritable(Exception):
  """A folder the run writes to cannot be written."""


def read_config_file(workdir: str | Path) -> dict | None:
  """The config train.py wrote to `workdir` (JSON form), None where there is none. eval.py reads it to know the
  run's task and keys, so one that does not read is an error naming it."""
  path = Path(workdir) / CONFIG_FILE
  if not path.is_file():
    return None
  try:
    saved = json.loads(path.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    saved = e
  if not isinstance(saved, dict):
    raise ValueError(f"{path} does not read as a JSON object ({saved}): cut short or edited? eval.py reads it to "
                     "know the run's task; restore it (every checkpoint keeps the run's config in its meta/ folder).")
  return saved


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


def check_creatable(directory: Path, flag: str) -> None:
  """Whether `directory` is a writable folder or could be made one (its nearest existing ancestor is a writable
  folder), creating nothing: a refusal that comes later leaves no empty folder behind."""
  existing = directory.absolute()
  while not existing.exists():
    existing = existing.parent
  if not existing.is_dir():
    raise NotWritable(f"{directory} cannot be a folder: {existing} is a file; pass another {flag}.")
  try:
    with tempfile.TemporaryFile(dir=existing):
      pass
  except OSError as e:
    raise NotWritable(f"{directory} cannot be written ({existing}: {e.strerror or e}); make it writable, or pass "
                      f"another {flag}.") from e


def mesh_shape(cfg: ml_collections.ConfigDict) -> tuple[int, int]:
  """(data, fsdp) sizes of config.mesh over all devices (data=-1 takes what fsdp leaves)."""
  count = jax.device_count()
  fsdp = cfg.fsdp
  data_size = cfg.data if cfg.data > 0 else count // max(fsdp, 1)
  if fsdp < 1 or data_size * fsdp != count:
    raise ValueError(f"config.mesh data={cfg.data} x fsdp={fsdp} does not cover the {count} devices; "
                     f"use data=-1 with an fsdp that divides {count}.")
  return data_size, fsdp


def make_mesh(cfg: ml_collections.ConfigDict) -> tuple[Mesh, tuple]:
  """Mesh ("data", "fsdp") of `mesh_shape`, and the backbone's rules: FSDP-sharded along "fsdp" when
  fsdp > 1, replicated otherwise."""
  shape = mesh_shape(cfg)
  rules = sharding.FSDP_RULES if shape[1] > 1 else sharding.REPLICATED_RULES
  return sharding.make_mesh(shape, ("data", "fsdp")), rules


def check_batching(c: ml_collections.ConfigDict) -> None:
  if c.batch_size % c.accum_steps or (c.batch_size // c.accum_steps) % jax.device_count():
    raise ValueError(f"batch_size={c.batch_size} must split into accum_steps={c.accum_steps} micro-batches "
                     f"whose size divides over the {jax.device_count()} devices.")


# The smallest meaningful value of each count in a classifier config (config.check_minimums).
MINIMUMS = {"epochs": 1, "batch_size": 1, "accum_steps": 1, "max_steps": 0, "log_every_steps": 1, "seed": 0,
            "eval.batch_size": 1, "eval.patience": 1, "checkpoint.keep": 1, "checkpoint.every_steps": 0,
            "data_threads": 1, "preprocessing.max_length": 1, "manifest.seed": 0, "missing.seed": 0}

# The range of each optimizer setting (`check_optimizer`): its test and its description. NaN passes no test.
POSITIVE = (lambda v: 0 < v < math.inf, "a finite number > 0")
NON_NEGATIVE = (lambda v: 0 <= v < math.inf, "a finite number >= 0")
BETA = (lambda v: 0 <= v < 1, "a number in [0, 1)")
OPTIMIZER_RANGES = {"lr": POSITIVE, "weight_decay": NON_NEGATIVE, "b1": BETA, "b2": BETA, "eps": POSITIVE,
                    "warmup_fraction": (lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
                    # per-partition factors of lr and weight_decay: each entry is checked
                    "lr_mults": NON_NEGATIVE, "wd_mults": NON_NEGATIVE}


def check_optimizer(section: ml_collections.ConfigDict, prefix: str) -> None:
  """Refuses an optimizer setting of `section` (config.<prefix>) outside its range, naming it: a negative or
  infinite learning rate or a b1 of 1.5 trains without complaint to a useless model (an infinite one to NaN), and a
  warm-up longer than the run fails inside optax, naming no key. Checks the settings the section has (the
  classifier's optim has them all, the MLLM's stages lr, weight_decay and warmup_fraction)."""
  for key, (valid, allowed) in OPTIMIZER_RANGES.items():
    if key not in section:
      continue
    value = section[key]
    entries = ({f"{key}.{name}": v for name, v in value.items()} if isinstance(value, ml_collections.ConfigDict)
               else {key: value})
    for name, v in entries.items():
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not valid(v):
        raise config_lib.ConfigError(f"config.{prefix}.{name}={v!r}: must be {allowed}.")
  if "decay" in section and section.decay not in step_lib.DECAYS:
    raise config_lib.ConfigError(f"config.{prefix}.decay={section.decay!r}: use one of {step_lib.DECAYS}.")


def check_batch_size(key: str, batch_size: int, samples: int, split: str) -> None:
  """A batch beyond the split holds padding only past its samples, and a batch of a size far beyond it runs out of
  memory minutes later: refused once the split's size is known."""
  if batch_size > samples:
    raise config_lib.ConfigError(f"config.{key}={batch_size} is more than the {samples} samples of {split}; use "
                                 f"at most {samples}.")


def check_embedded_cache(section: ml_collections.ConfigDict, embedded_model, key: str) -> None:
  """`section` (config.<key>) selects `embedded_model` (backbones.embedded or backbones.embedded_lm) with path
  "embedded": its first use pre-trains it into cache_dir, so a cache_dir it cannot write is refused before that,
  not when the minutes of pre-training are spent."""
  if section.path != embedded_model.NAME:
    return
  cache = Path(section.cache_dir).expanduser()
  if not embedded_model.is_built(cache / embedded_model.directory_name(section.seed)):
    check_writable(cache, f"--config.{key}.cache_dir")


@dataclasses.dataclass(frozen=True)
class Settings:
  """A classifier config's sections read and checked once (`validate`); the run reads these, not the ConfigDict's
  strings again. The preprocessing is typed once the backbone's image processing is known (`Job.prep`)."""
  adapter: object  # the method's config (mora_jax.adapters.registry), None for the linear probe
  missing: data.Missing
  manifest: data.Manifest | None  # dataset "manifest" only
  manual_dir: str | None  # the raw download, checked to exist
  backbone_dtype: object  # the frozen backbone's compute dtype (config.backbone.dtype resolved)


def check_sources(config: ml_collections.ConfigDict) -> data.Manifest | None:
  """What the data is prepared from is there (a manual_dir, a manifest; data.check_source), and a manifest's
  metric is one its labels allow; returns the manifest of dataset "manifest"."""
  if config.manual_dir and not Path(config.manual_dir).expanduser().is_dir():
    raise FileNotFoundError(f"config.manual_dir={config.manual_dir!r} does not exist; put the raw "
                            f"{config.dataset} download there (see its MANUAL_DOWNLOAD_INSTRUCTIONS in "
                            "mora_jax/data/builders/manual.py).")
  settings_manifest = manifest(config)
  builder = check_source(config.dataset, config.data_dir, config.manual_dir or None, settings_manifest)
  if settings_manifest is not None:  # its builder has read the manifest's classes: no need to prepare it
    check_metric(config, data.Classes(names=builder.contents.class_names, multi_label=builder.contents.multi_label))
  return settings_manifest


def validate(config: ml_collections.ConfigDict, train: bool = True, sources: bool = True) -> Settings:
  """Every check a config allows without reading data or weights, so that a mistake is reported before any
  download, data preparation or backbone pre-training (minutes, on a first run); returns the typed settings.
  `train`: also the training batch, which evaluation does not use. `sources=False`: not whether the dataset is
  there (a plan over datasets not downloaded yet)."""
  config_lib.check_minimums(config, MINIMUMS)
  if config.dataset not in (*data.BUILDERS, data.MANIFEST):
    raise ValueError(f"config.dataset={config.dataset!r}: use one of {sorted(data.BUILDERS)}, or "
                     f"{data.MANIFEST!r} with config.manifest.path for your own data.")
  settings_manifest = check_sources(config) if sources else None
  missing = data.Missing(**config.missing)
  try:
    adapter = adapters.from_config(config.adapter.to_dict())
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.adapter: {e}") from e
  if config.head.type not in HEADS:
    raise ValueError(f"config.head.type={config.head.type!r}: use one of {HEADS}.")
  if config.head.type == "mlp":  # the linear head has no hidden layer to size
    config_lib.check_minimums(config, {"head.hidden": 1})
  # missing_image and transparency, with the default image processing: the backbone's is known once it is loaded
  # (after its pre-training, on a first run of the embedded one).
  try:
    data.Preprocessing(**config.preprocessing)
  except ValueError as e:
    raise ValueError(f"config.preprocessing: {e}") from e
  backbone_dtype = backbones.compute_dtype(config.backbone.dtype)
  if not config.backbone.path and not config.backbone.random_preset:
    raise ValueError("config.backbone: set `path` (a Hugging Face id, a checkpoint directory or 'embedded') or "
                     "`random_preset` (a randomly initialised CLIP, e.g. 'tiny').")
  mesh_shape(config.mesh)
  prefix_cache.check(config, adapter)
  if config.pixel_store not in pixel_store_lib.MODES:
    raise ValueError(f"config.pixel_store={config.pixel_store!r}: use one of {pixel_store_lib.MODES}.")
  if config.data_workers < -1:
    raise ValueError(f"config.data_workers={config.data_workers}: use -1 (one per core of this host), 0 (decode in "
                     "the main process) or a number of worker processes.")
  if train:
    check_batching(config)
    check_optimizer(config.optim, "optim")
  return Settings(adapter=adapter, missing=missing, manifest=settings_manifest,
                  manual_dir=config.manual_dir or None, backbone_dtype=backbone_dtype)


@dataclasses.dataclass
class Job:
  """What a config builds: mesh, backbone, preprocessing, and the classifier split into graph and params."""
  config: ml_collections.ConfigDict
  settings: Settings
  mesh: Mesh
  rules: tuple
  backbone: backbones.Backbone
  prep: data.Preprocessing
  graphdef: nnx.GraphDef
  params: dict  # adapters.split layout: {"backbone", "adapter": {...}, "head"}
  class_names: tuple[str, ...]
  multi_label: bool
  stores: dict = dataclasses.field(default_factory=dict)  # (dataset, split) -> its pixel store, or None
  # split -> passes the run makes over the split's images (pixel_store="auto" builds a store beyond 1); set by
  # prefix_cache.prepare, 1 where unset (one pass: the test's shared tower features).
  image_reads: dict = dataclasses.field(default_factory=dict)

  @property
  def metric(self) -> str:
    return selection_metric(self.config, self.multi_label)

  def load(self, split: str, missing: data.Missing | None = None) -> data.Dataset:
    ds = load_split(self.config, self.settings, split, missing)
    truncation = data.truncation_warning(ds, self.backbone.tokenizer, self.prep.max_length,
                                         text_positions(self.config, self.backbone))
    if truncation:
      say(truncation)
    return ds

  def batches(self, ds: data.Dataset, global_batch: int, train: bool, accum_steps: int = 1,
              cache: prefix_cache.Cache | None = None, skip_corrupt: bool | None = None):
    """This process's batches of `ds`: decoded and tokenized records, or rows of the split's `cache`."""
    per_process, remainder = divmod(global_batch, jax.process_count())
    if remainder:
      raise ValueError(f"batch {global_batch} is not divisible by the {jax.process_count()} processes.")
    skip_corrupt = self.config.skip_corrupt if skip_corrupt is None else skip_corrupt
    if cache is not None:
      return prefix_cache.batches(cache, ds, per_process, train=train, seed=self.config.seed, prep=self.prep,
                                  accum_steps=accum_steps, skip_corrupt=skip_corrupt)
    return data.batches(ds, per_process, self.backbone.tokenizer, train=train, seed=self.config.seed,
                        prep=self.prep, process_index=jax.process_index(), process_count=jax.process_count(),
                        accum_steps=accum_steps, num_threads=self.config.data_threads,
                        workers=decode_workers(self.config), store=self.pixel_store(ds), skip_corrupt=skip_corrupt)

  def pixel_store(self, ds: data.Dataset) -> pixel_store_lib.PixelStore | None:
    """The split's decoded images (mora_jax/data/pixel_store.py), opened or built (by process 0) on first use."""
    name = (ds.name, ds.split)
    if name not in self.stores:
      root = Path(self.config.data_dir).expanduser() / "pixel_store"
      self.stores[name] = _main_process_first(
          lambda: pixel_store_lib.open_or_build(ds.source, ds.name, ds.split, self.prep, root,
                                                self.config.pixel_store, decode_workers(self.config), say,
                                                self.image_reads.get(ds.split, 1)),
          f"pixel store {ds.name}/{ds.split}")
    return self.stores[name]


def decode_workers(config: ml_collections.ConfigDict) -> int:
  """Image-decoding worker processes: config.data_workers, or (-1) one per core this process may run on, and none
  on a host of 1 or 2 cores, where Grain's threads in the main process decode faster (PIL releases the GIL, and
  workers pay for sending pixels back: bench/feed.py, docs/benchmarks.md)."""
  if config.data_workers != -1:
    return config.data_workers
  cores = len(os.sched_getaffinity(0))
  return cores if cores > 2 else 0


def text_positions(config: ml_collections.ConfigDict, backbone: backbones.Backbone) -> int | None:
  """The most tokens the backbone's text tower reads where its checkpoint fixes it; None for a random preset,
  whose tower is made preprocessing.max_length long."""
  return backbone.model.config.text.max_position_embeddings if config.backbone.path else None


def check_max_length(config: ml_collections.ConfigDict, backbone: backbones.Backbone) -> None:
  """Texts padded past what the text tower reads would fail at the first step, after the data is prepared."""
  positions = text_positions(config, backbone)
  if positions is not None and config.preprocessing.max_length > positions:
    raise config_lib.ConfigError(
        f"--config.preprocessing.max_length={config.preprocessing.max_length} is more than the {positions} tokens "
        f"the text tower of backbone {config.backbone.path!r} reads; use at most {positions}.")


def manifest(config: ml_collections.ConfigDict) -> data.Manifest | None:
  """The manifest of dataset "manifest" (None for the others)."""
  if config.dataset != data.MANIFEST:
    return None
  if not config.manifest.path:
    raise ValueError(f"dataset={data.MANIFEST!r} needs config.manifest.path: your .jsonl or .csv file "
                     "(docs/own_data.md).")
  m = config.manifest
  return data.Manifest(path=m.path, image_root=m.image_root, split_fractions=tuple(m.split_fractions), seed=m.seed,
                       classes=tuple(m.classes))


def selection_metric(config: ml_collections.ConfigDict, multi_label: bool) -> str:
  """What validation maximises: the dataset's primary metric, or a manifest's config.manifest.metric."""
  chosen = config.manifest.metric if config.dataset == data.MANIFEST else ""
  return chosen or metrics_lib.primary(config.dataset, multi_label)


def check_metric(config: ml_collections.ConfigDict, classes: data.Classes) -> None:
  """A manifest's chosen metric must be one that evaluation measures for its labels."""
  available = metrics_lib.names(classes.multi_label, len(classes.names))
  if selection_metric(config, classes.multi_label) not in available:
    raise ValueError(f"config.manifest.metric={config.manifest.metric!r} is not measured for this manifest "
                     f"({'multi-label' if classes.multi_label else 'single-label'}, {len(classes.names)} classes); "
                     f"use one of {available}, or \"\" for {metrics_lib.primary(config.dataset, classes.multi_label)}"
                     ".")


def _main_process_first(prepare, what: str):
  """`prepare()` on process 0, then on the others once it is done: process 0 writes the shared files (in
  data_dir) and the others read them."""
  if jax.process_count() == 1:
    return prepare()
  result = prepare() if sharding.is_main_process() else None
  multihost_utils.sync_global_devices(f"prepared {what}")
  return result if result is not None else prepare()


def load_split(config: ml_collections.ConfigDict, settings: Settings, split: str,
               missing: data.Missing | None = None) -> data.Dataset:
  """One split with its missing table (built, on first use, by process 0)."""
  return _main_process_first(
      lambda: data.load(config.dataset, split, config.data_dir, settings.manual_dir, missing or settings.missing,
                        one_sample_per_text=config.one_sample_per_text, log=say, manifest=settings.manifest,
                        skip_corrupt=config.skip_corrupt),
      f"{config.dataset}/{split}")


def build_job(config: ml_collections.ConfigDict, settings: Settings | None = None) -> Job:
  """The mesh, backbone, preprocessing and classifier of `config` (its `validate`d settings, checked here unless
  given); the data is read by `Job.load`."""
  settings = settings or validate(config, train=False)
  mesh, rules = make_mesh(config.mesh)
  backbone = backbones.load(config.backbone, config.preprocessing.max_length, config.data_dir, mesh=mesh,
                            rules=rules, log=say)
  check_max_length(config, backbone)
  prep = data.Preprocessing(image=backbone.image_processing, **config.preprocessing)
  classes = _main_process_first(
      lambda: data.classes(config.dataset, config.data_dir, settings.manual_dir, log=say, manifest=settings.manifest,
                           skip_corrupt=config.skip_corrupt),
      config.dataset)
  clf = adapters.build_classifier(backbone.model, settings.adapter, len(classes.names), classes.multi_label,
                                  seed=config.seed, head=config.head.type, head_hidden=config.head.hidden)
  graphdef, params = adapters.split(clf)
  return Job(config, settings, mesh, rules, backbone, prep, graphdef, params, classes.names, classes.multi_label)


def summary_lines(job: Job) -> list[str]:
  per = adapters.partition.count(job.params)
  total = sum(per.values())
  lines = [f"parameters: {total:,} in all, {total - per['backbone']:,} trainable "
           f"({100 * (total - per['backbone']) / total:.3f}%)"]
  lines += [f"  {name:<26} {count:>13,}  {100 * count / total:8.3f}%" for name, count in per.items()]
  return lines
