"""How long a run takes on this host and what it leaves on disk, for `--dry_run`, from rates measured here.

The probe is the feed and step benches' measurement (bench/feed.py --busy) on the run's own recipe: `loop.start`
of the recipe on synthetic photos (JPEGs of 320-640 px; bench/feed.py's decode table reads the same), with a
randomly initialised backbone of the recipe's architecture when its weights are not on this host (they do not
change the time), then steady train steps timed after compilation:
- "full": the pixel store and the prefix cache off: every step decodes, runs both towers and the backward; what a
  run without a prefix cache does every epoch, and what building a prefix cache costs per sample;
- "cached": the recipe's prefix cache on: steps read the stored activations and run the adapted layers only.
Rates are kept in `<workdir>/throughput.json` per device kind and count, architecture, adapter family, first
adapted layer and batch, so each is measured once per host. A finished run of the same recipe replaces the
estimate by its measured wall time.

Estimated seconds of a run: with a prefix cache, one full pass over train and validation (the build), then the
epochs at the cached rate; without, every epoch at the full rate; the test, two full passes over the test split
(each present tower and the dummies once), and as much per eval.py re-test. Validation and test are counted at the training rate per sample, an
upper bound (no backward). Disk: `checkpoint.keep` checkpoints and the best one of the trained parameters and AdamW's two moments
(float32) per run; per dataset, shared by its runs, the pixel store (decoded images, when images are read more
than once) and the prefix cache's files (beyond `prefix_cache_memory_gb`).

MLLM runs (mora_jax.train.answering) are not probed: a finished MLLM run of the table on this host stands for the
others (`from_finished_runs`), its wall time and the size of its checkpoint folders; none finished, none estimated.
"""

import dataclasses
import functools
import json
import shutil
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx
from PIL import Image

from mora_jax import adapters, data
from mora_jax import clip as clip_lib
from mora_jax.backbones import embedded
from mora_jax.data import array_files, pixel_store
from mora_jax.models import hf
from mora_jax.models.config import preset
from mora_jax.reproduce.runs import WALL_FILE
from mora_jax.train import config as config_lib
from mora_jax.train import loop, prefix_cache, recipes

PROBE_FILE = "throughput.json"
# Hugging Face CLIP ids -> the preset of their architecture (mora_jax.models.config.PRESETS).
HF_PRESETS = {"openai/clip-vit-base-patch16": "ViT-B/16", "openai/clip-vit-base-patch32": "ViT-B/32",
              "openai/clip-vit-large-patch14": "ViT-L/14", "openai/clip-vit-large-patch14-336": "ViT-L/14-336"}
# (train, validation, test samples, classes, multi-label) of docs/protocol.md, for a dataset not prepared here.
# MM-IMDb's counts are movies: a movie with k plots is k samples, so its time is a lower bound until prepared.
SIZES = {"mm_imdb": (15552, 2608, 7799, 23, True), "upmc_food101": (61142, 6846, 22716, 101, False),
         "hateful_memes": (8500, 500, 1000, 2, False), "easy_vqa": (34680, 3895, 9673, 13, False)}
PROBE_STEPS = 5


def write_photos(directory: Path, count: int, seed: int = 0) -> Path:
  """A manifest of `count` JPEG 'photos' (smooth colour fields with noise, ~25-60 KB) of 320-640 px and
  77-token texts; the last two rows are the validation and test splits, the rest train."""
  rng = np.random.RandomState(seed)
  directory.mkdir(parents=True, exist_ok=True)
  lines = []
  for i in range(count):
    height, width = rng.randint(320, 641, size=2)
    coarse = rng.randint(0, 256, (8, 8, 3)).astype(np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((int(width), int(height)), Image.Resampling.BICUBIC))
    image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    Image.fromarray(image).save(directory / f"{i}.jpg", quality=90)
    # ~80 bytes: 77 tokens and a truncation with the byte-level tokenizer (no vocabulary download).
    words = " ".join(f"w{rng.randint(1000):03d}" for _ in range(16))
    split = {count - 2: "validation", count - 1: "test"}.get(i, "train")  # a manifest needs all three splits
    lines.append(json.dumps({"image": f"{i}.jpg", "text": words, "label": f"class{i % 4}", "split": split}))
  path = directory / "photos.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return path


def steady_seconds(run: loop.Run, steps: int) -> float:
  """Seconds of `steps` loop steps (next batch, transfer, train step) after one for compilation."""
  loop.advance(run)
  jax.block_until_ready(run.state_leaves)
  begin = time.perf_counter()
  for _ in range(steps):
    metrics, _ = loop.advance(run)
  jax.block_until_ready(metrics)
  return time.perf_counter() - begin


def probe_backbone(config: ml_collections.ConfigDict) -> tuple[str, list[tuple[str, str]]] | None:
  """(architecture, backbone overrides) of the probe: the run's own weights when they are on this host, a random
  backbone of a Hugging Face id's architecture, or None (an id of unknown architecture)."""
  b = config.backbone
  if b.random_preset:
    return b.random_preset, []
  if b.path == "embedded":
    return embedded.directory_name(b.seed), []
  if Path(b.path).expanduser().is_dir():
    return Path(b.path).name, []
  if Path(b.path).name.startswith("easy_vqa_clip-"):  # a study backbone not built yet: the embedded architecture
    return embedded.directory_name(b.seed), [("backbone.path", "embedded")]
  if b.path in HF_PRESETS:
    return HF_PRESETS[b.path], [("backbone.path", ""), ("backbone.random_preset", HF_PRESETS[b.path])]
  return None


def _family(config: ml_collections.ConfigDict) -> str:
  return "prompts" if config.adapter.method in recipes.PROMPT_METHODS else "projections"


def uses_prefix_cache(config: ml_collections.ConfigDict) -> bool:
  """Whether the run trains from a prefix cache (prefix_cache.plan for its epochs)."""
  method = adapters.from_config(config.adapter.to_dict())
  return prefix_cache.plan(config, method, config.epochs) is not None


def probe_batch(config: ml_collections.ConfigDict) -> int:
  """The recipe's batch on an accelerator; 8 (a multiple of the devices) on CPU, where a step at 256 takes
  minutes and the rate per sample hardly depends on the batch."""
  devices = jax.device_count()
  if jax.default_backend() != "cpu":
    return config.batch_size
  return max(8 // devices, 1) * devices


def probe_key(config: ml_collections.ConfigDict) -> str | None:
  backbone = probe_backbone(config)
  if backbone is None:
    return None
  device = jax.devices()[0].device_kind
  cache = "prefix cache" if uses_prefix_cache(config) else "no prefix cache"
  return (f"{device} x{jax.device_count()} / {backbone[0]} / {_family(config)} / start_layer "
          f"{config.adapter.get('start_layer', 0)} / {cache} / batch {probe_batch(config)}")


def measure(config: ml_collections.ConfigDict, directory: Path, steps: int = PROBE_STEPS, log=print) -> dict:
  """The probe of `config`'s recipe in `directory` (kept: the photos and their prepared files are reused)."""
  name, backbone = probe_backbone(config)
  batch = probe_batch(config)
  photos = directory / "photos.jsonl"
  if not photos.is_file():
    write_photos(directory, (steps + 2) * batch + 2)
  probe = ml_collections.ConfigDict(config.to_dict())
  values = [("dataset", data.MANIFEST), ("manifest.path", str(photos)), ("data_dir", str(directory / "data")),
            ("manual_dir", ""), ("batch_size", batch), ("eval.batch_size", batch), ("epochs", 2), ("max_steps", 0),
            ("checkpoint.keep", 1), ("pixel_store", "off"), ("log_every_steps", 10**6), *backbone]
  config_lib.apply_overrides(probe, [(k, str(v)) for k, v in values], log=lambda _: None)
  result = {"batch": batch}
  modes = ["off"] + (["on"] if uses_prefix_cache(config) else [])
  for mode in modes:
    log(f"measuring this host's training rate: {name}, {_family(config)}, prefix cache {mode}, batch {batch}")
    config_lib.override(probe, "prefix_cache", mode)
    workdir = directory / f"run-{mode}"
    shutil.rmtree(workdir, ignore_errors=True)  # an earlier probe's checkpoints would resume it
    run = loop.start(probe, workdir)
    try:
      seconds = steady_seconds(run, steps)
      if mode == "off":
        result["full"] = steps * batch / seconds
        result["pixel_bytes"] = array_files.nbytes(pixel_store.layout(1, run.task.prep))
      else:
        result["cached"] = steps * batch / seconds if run.task.caches else None
        plan = prefix_cache.plan(probe, run.task.settings.adapter, probe.epochs)
        # Per sample: a split's cache of n samples holds n + 1 rows (the last for the dummies).
        one, two = (array_files.nbytes(prefix_cache.layout(run.task, plan.layer, n), plan.dtype) if plan else 0
                    for n in (1, 2))
        result["prefix_bytes"] = two - one
    finally:
      run.ckpt.close()
      run.writer.close()
      shutil.rmtree(workdir, ignore_errors=True)
  return result


def rates(config: ml_collections.ConfigDict, workdir: Path, log=print) -> dict | None:
  """This host's measured rates for `config`'s recipe (measured now if they are not in PROBE_FILE yet), or None
  for a backbone of unknown architecture."""
  key = probe_key(config)
  if key is None:
    return None
  path = workdir / PROBE_FILE
  known = json.loads(path.read_text()) if path.is_file() else {}
  if key not in known:
    known[key] = measure(config, workdir / "throughput_probe", log=log)
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(known, indent=2) + "\n")
  return known[key]


def sizes(dataset: str, data_dir: str) -> tuple[int, int, int, int, bool]:
  """(train, validation, test samples, classes, multi-label): of the prepared dataset, else docs/protocol.md's."""
  builder = data.BUILDERS[dataset](data_dir=str(Path(data_dir).expanduser()))
  if not builder.is_prepared() or dataset == "mm_imdb":  # MM-IMDb: records are movies, samples are plots
    return SIZES[dataset]
  splits = builder.info.splits
  return (splits["train"].num_examples, splits["validation"].num_examples, splits["test"].num_examples,
          *SIZES[dataset][3:])


def trainable_parameters(config: ml_collections.ConfigDict, num_classes: int, multi_label: bool) -> int | None:
  """The run's trained parameters, counted on an abstract model (nothing allocated or loaded)."""
  backbone = probe_backbone(config)
  if backbone is None:
    return None
  name, _ = backbone
  directory = Path(config.backbone.cache_dir).expanduser() / name if config.backbone.path == "embedded" else (
      Path(config.backbone.path).expanduser())
  if name in HF_PRESETS.values() or config.backbone.random_preset:
    model_config = preset(name)
  elif directory.is_dir():
    model_config = hf.read_config(directory)
  else:
    return None
  method = adapters.from_config(config.adapter.to_dict())
  clf = nnx.eval_shape(lambda backbone: adapters.build_classifier(
      backbone, method, num_classes, multi_label, head=config.head.type, head_hidden=config.head.hidden),
                       nnx.clone(_abstract_backbone(model_config)))
  return adapters.count_parameters(clf)["trainable"]


@functools.lru_cache(maxsize=4)
def _abstract_backbone(model_config) -> clip_lib.CLIP:
  """The architecture's CLIP as shapes only, built once: the runs of a table share it."""
  return nnx.eval_shape(lambda: clip_lib.init(model_config))


@dataclasses.dataclass(frozen=True)
class Estimate:
  seconds: float | None  # None: no rate for this recipe on this host
  retest_seconds: float | None  # one eval.py re-test at another missing setting
  checkpoint_bytes: int | None
  pixel_store_bytes: int  # shared by the dataset's runs
  prefix_cache_disk_bytes: int  # shared by the runs with the same backbone and first adapted layer


# An MLLM run's checkpoint folders: stage 1's (the projector) and stage 2's (answering.Answering.stages).
MLLM_CHECKPOINT_DIRS = ("stage1", "checkpoints")


def from_finished_runs(directories: list[Path]) -> Estimate:
  """An MLLM run's estimate from finished runs' folders: the longest wall time (their WALL_FILE, training and
  testing as they ran here) and the largest checkpoint folders; None for each without a finished run. The runs
  differ in their settings (epochs, stage-1 steps): a rough estimate, not a measure of this config."""
  walls = [float(path.read_text()) for d in directories if (path := d / WALL_FILE).is_file()]
  stored = [sum(f.stat().st_size for name in MLLM_CHECKPOINT_DIRS for f in (d / name).rglob("*") if f.is_file())
            for d in directories]
  return Estimate(max(walls) if walls else None, 0.0, max(stored) if stored else None, 0, 0)


def estimate(config: ml_collections.ConfigDict, measured: dict | None) -> Estimate:
  n_train, n_val, n_test, classes, multi_label = sizes(config.dataset, config.data_dir)
  trained = trainable_parameters(config, classes, multi_label)
  # The `keep` latest checkpoints and the best one, each the trained parameters and AdamW's two moments.
  checkpoint_bytes = None if trained is None else (config.checkpoint.keep + 1) * trained * 4 * 3
  if measured is None:
    return Estimate(None, None, checkpoint_bytes, 0, 0)
  steps_per_epoch = -(-n_train // config.batch_size)
  train_samples = config.epochs * n_train
  if config.max_steps:
    train_samples = min(train_samples, config.max_steps * config.batch_size)
  epochs_validated = -(-train_samples // (steps_per_epoch * config.batch_size))
  full, cached = measured["full"], measured.get("cached")
  if cached and uses_prefix_cache(config):
    seconds = (n_train + n_val) / full + (train_samples + epochs_validated * n_val) / cached + 2 * n_test / full
    prefix = measured["prefix_bytes"] * (n_train + 1 + n_val + 1)
    prefix_disk = prefix if prefix > config.prefix_cache_memory_gb * 2**30 else 0
    pixel = 0
  else:
    seconds = (train_samples + epochs_validated * n_val + 2 * n_test) / full
    prefix_disk = 0
    pixel = measured["pixel_bytes"] * (n_train + n_val + n_test) if config.pixel_store != "off" and (
        config.epochs > 1) else 0
  return Estimate(seconds, 2 * n_test / full, checkpoint_bytes, pixel, prefix_disk)
