"""Every frozen activation computed once: the prefix-activation cache.

The layers below an adapter's first adapted layer (`adapter.start_layer`) are frozen, have no dropout, and see
the same input every epoch (the protocol has no augmentation, and a missing modality is always the same dummy).
So before the first epoch each tower's hidden state at the input of that layer is computed once per sample for
its present input and once for the dummy, and every epoch then runs only the adapted layers, the head and the
loss on stored rows. The linear probe stores the towers' final features, so its epochs train the head alone.

A split's cache holds the present inputs of all its samples (row i for sample i) and the dummy (row n), so one
cache serves every missing table and scenario: a batch takes row i of a tower whose input the sample has, and
row n of a tower whose input is missing. It lives in host memory when it fits `prefix_cache_memory_gb`, else in
files under `<data_dir>/prefix_cache/` (a filesystem all hosts see, like the prepared data), keyed by everything
its values depend on; a build left incomplete by a kill is completed, and a file whose checksum fails is rebuilt
with a warning.

Config: prefix_cache "auto" (on when a run trains more than one epoch, so that stored rows are reused) | "on" |
"off"; prefix_cache_dtype "auto" (the backbone's compute dtype) | "float32" | "bfloat16";
prefix_cache_memory_gb (host memory per process for caches; beyond it, disk).
"""

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from mora_jax import adapters, backbones, data, console, sharding
from mora_jax.data import array_files, inputs
from mora_jax.data import missing as missing_lib
from mora_jax.data import pipeline

MODES = ("auto", "on", "off")
DTYPES = ("auto", "float32", "bfloat16")
FORMAT_VERSION = 2  # 2: 16-bit images are rescaled to 8 bits (clipped to 255 before)
META_FILE = array_files.META_FILE
ROW_KEYS = ("label", "group", "corrupt")  # per-sample values stored beside the activations (no dummy row)
CacheError = array_files.SpaceError  # a cache that cannot be built where configured; the message says the fix
SPACE_FIXES = ("free space, point --config.data_dir at a larger disk, halve the cache with "
               "--config.prefix_cache_dtype=bfloat16, raise --config.prefix_cache_memory_gb to keep it in memory, or "
               "turn it off with --config.prefix_cache=off.")


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a run caches: tower inputs at `layer` (inputs.Prefix), or the final features (inputs.Features) when
  `layer` is None."""
  layer: int | None
  dtype: np.dtype
  memory_bytes: float
  root: Path  # where disk caches live
  device_bytes: float = 0.0  # the budget for caches kept on the devices (before host memory and disk)

  @property
  def form(self) -> type:
    return inputs.Features if self.layer is None else inputs.Prefix


def check(config, adapter) -> None:
  """The cache options of a config, whose adapter section reads as `adapter` (job.validate)."""
  if config.prefix_cache not in MODES:
    raise ValueError(f"config.prefix_cache={config.prefix_cache!r}: use one of {MODES}.")
  if config.prefix_cache_dtype not in DTYPES:
    raise ValueError(f"config.prefix_cache_dtype={config.prefix_cache_dtype!r}: use one of {DTYPES}.")
  if config.prefix_cache_memory_gb < 0:
    raise ValueError(f"config.prefix_cache_memory_gb={config.prefix_cache_memory_gb} must be >= 0.")
  if config.prefix_cache_device_gb < 0 and config.prefix_cache_device_gb != -1:
    raise ValueError(f"config.prefix_cache_device_gb={config.prefix_cache_device_gb}: use -1 (half the first device's "
                     "free memory, where the device reports it) or a size in GiB >= 0.")
  if config.prefix_cache == "on" and adapter is not None and not adapter.frozen_prefix:
    raise ValueError(f"config.prefix_cache='on', but adapter method {adapter.name!r} changes the layers below "
                     "its start layer, so they cannot be cached: use prefix_cache='auto' or 'off'.")


def plan(config, adapter, uses: float) -> Plan | None:
  """The cache of a run whose rows are each read `uses` times (epochs trained; scenarios tested), or None:
  off, or "auto" with rows read once (building the cache then costs what it saves)."""
  if config.prefix_cache == "off" or (adapter is not None and not adapter.frozen_prefix):
    return None
  if config.prefix_cache == "auto" and uses <= 1:
    return None
  name = config.prefix_cache_dtype
  dtype = np.dtype(backbones.compute_dtype(config.backbone.dtype)) if name == "auto" else np.dtype(
      {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[name])
  return Plan(None if adapter is None else adapter.start_layer, dtype, config.prefix_cache_memory_gb * 2**30,
              Path(config.data_dir).expanduser() / "prefix_cache", device_budget(config.prefix_cache_device_gb))


def device_budget(gigabytes: float) -> float:
  """Bytes of device memory for caches: `gigabytes`, or (-1) half of what the first local device has free, where
  it reports its memory (accelerators; a CPU reports none, and its "device" memory is the host's anyway)."""
  if gigabytes >= 0:
    return gigabytes * 2**30
  stats = jax.local_devices()[0].memory_stats() or {}
  if "bytes_limit" not in stats:
    return 0.0
  return 0.5 * (stats["bytes_limit"] - stats.get("bytes_in_use", 0))


@dataclasses.dataclass
class Cache:
  """One split's stored rows: activation arrays with n + 1 rows (row n: the dummy), named by the fields of `form`
  (inputs.Prefix or inputs.Features), and ROW_KEYS with n."""
  arrays: dict[str, np.ndarray]
  form: type
  num_samples: int
  directory: Path | None = None  # None: in host memory
  build_seconds: float = 0.0  # what computing it took this run (0: reused from disk)
  # The activations on the devices (replicated), when the cache lives there: a batch then carries row numbers
  # (inputs.Rows) and the step gathers the rows (`gather`); `arrays` keeps only ROW_KEYS.
  device: inputs.Prefix | inputs.Features | None = None

  def activations(self) -> inputs.Prefix | inputs.Features:
    """The activation arrays (host memory or files) as a `form`."""
    return self.form(**{field.name: self.arrays[field.name] for field in dataclasses.fields(self.form)})

  def rows(self, indices: np.ndarray, table: np.ndarray) -> dict:
    """The batch of record `indices` (-1: padding) under missing `table`: each tower's row of the sample, or the
    dummy row where the table says its input is missing (and for padding); for a cache on the devices, the
    numbers of those rows."""
    present = indices >= 0
    safe = np.where(present, indices, 0)
    codes = np.where(present, table[safe], missing_lib.COMPLETE).astype(np.int8)
    has_image = present & (codes != missing_lib.IMAGE_MISSING)
    has_text = present & (codes != missing_lib.TEXT_MISSING)
    vision_rows = np.where(has_image, safe, self.num_samples)
    text_rows = np.where(has_text, safe, self.num_samples)
    corrupt = has_image & self.arrays["corrupt"][safe]
    if self.device is not None:
      batch_inputs = inputs.Rows(vision_rows.astype(np.int32), text_rows.astype(np.int32))
    else:
      batch_inputs = jax.tree.map(np.asarray, self.activations().take(vision_rows, text_rows))
    label = self.arrays["label"][safe]
    return {"inputs": batch_inputs, "label": np.where(present.reshape((-1,) + (1,) * (label.ndim - 1)), label, 0),
            "group": np.where(present, self.arrays["group"][safe], -1).astype(np.int8), "index": indices,
            "valid": present & ~corrupt, "corrupt": corrupt}


def gather(batch_inputs, device_activations):
  """Inside a jitted step: row numbers of a cache on the devices (inputs.Rows) -> those rows of its activations
  (`Cache.device`), in the form `Classifier.logits` reads; the other forms pass through."""
  if not isinstance(batch_inputs, inputs.Rows):
    return batch_inputs
  return device_activations.take(batch_inputs.vision_rows, batch_inputs.text_rows)


def to_device(cache: Cache, mesh) -> Cache:
  """`cache` (in host memory) with its activations replicated on every device of `mesh` (multi-host safe)."""
  device = sharding.replicate(cache.activations(), mesh)
  return dataclasses.replace(cache, arrays={k: cache.arrays[k] for k in ROW_KEYS}, device=device)


class _Rows:
  """Record indices -> a cached batch (Grain's map); a corrupt image is re-decoded to raise its own error unless
  skip_corrupt, as the decoding pipeline does."""

  def __init__(self, cache: Cache, ds: data.Dataset, prep: data.Preprocessing, skip_corrupt: bool):
    self.cache, self.ds, self.prep, self.skip_corrupt = cache, ds, prep, skip_corrupt

  def __call__(self, indices: np.ndarray) -> dict:
    batch = self.cache.rows(indices, self.ds.table)
    if batch["corrupt"].any() and not self.skip_corrupt:
      index = int(indices[np.argmax(batch["corrupt"])])
      self.prep.pixels(pipeline.record_image(self.ds.source[index], self.ds.name))
      raise ValueError(f"{self.ds.name} sample {index}: its image could not be decoded when the prefix cache was "
                       "built; fix the file, or pass --config.skip_corrupt=True to skip such samples.")
    return batch


def batches(cache: Cache, ds: data.Dataset, batch_size: int, *, train: bool, seed: int,
            prep: data.Preprocessing, accum_steps: int = 1, skip_corrupt: bool = False) -> grain.IterDataset:
  """`data.batches` read from `cache` instead of decoding: the same samples in the same order, with the same
  iterator state (resume positions are interchangeable), under `ds.table`'s missing codes."""
  if cache.num_samples != len(ds.source):
    raise ValueError(f"the prefix cache of {ds.name}/{ds.split} has {cache.num_samples} samples, the split "
                     f"{len(ds.source)}.")
  indices = pipeline.index_batches(len(ds.source), batch_size, train=train, seed=seed,
                                   process_index=jax.process_index(), process_count=jax.process_count(),
                                   accum_steps=accum_steps)
  return indices.map(_Rows(cache, ds, prep, skip_corrupt)).to_iter_dataset(
      grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))


def tokenizer_hash(tokenizer) -> str:
  """What the tokenizer maps text to: its class and its fast backend's definition (vocabulary, merges, pre- and
  post-processing), without the padding and truncation settings that each call rewrites."""
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is None:
    definition = sorted(tokenizer.get_vocab().items())
  else:
    definition = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("padding", "truncation")}
  return hashlib.sha256(f"{type(tokenizer).__name__}|{json.dumps(definition)}".encode()).hexdigest()


def key(job, ds: data.Dataset, layer: int | None, dtype: np.dtype) -> dict:
  """Everything a split's cached values depend on (a different key is a different cache), the fingerprint of a
  published dataset's raw files among them (a manifest's is in its name; easy-VQA has none: its caches stay)."""
  cache_key = {"format": FORMAT_VERSION, "backbone": job.backbone.identity["sha256"],
               "backbone_dtype": str(np.dtype(job.settings.backbone_dtype)),
               "dataset": ds.name, "split": ds.split, "samples": len(ds.source),
               "preprocessing": json.loads(json.dumps(dataclasses.asdict(job.prep), default=str)),
               "tokenizer": tokenizer_hash(job.backbone.tokenizer), "layer": "features" if layer is None else layer,
               "dtype": str(dtype)}
  sources = getattr(ds.source, "sources", "")
  return {**cache_key, "sources": sources} if sources else cache_key


def layout(job, layer: int | None, num_samples: int) -> dict:
  """name -> (shape, numpy dtype, or "act" for the activations' dtype) of a cache's arrays."""
  cfg = job.backbone.model.config
  rows = num_samples + 1
  if layer is None:
    out = {"vision_features": ((rows, cfg.projection_dim), "act"), "text_features": ((rows, cfg.projection_dim), "act")}
  else:
    length = job.config.preprocessing.max_length
    out = {"vision_hidden": ((rows, cfg.vision.num_patches + 1, cfg.vision.hidden_size), "act"),
           "text_hidden": ((rows, length, cfg.text.hidden_size), "act"),
           "text_mask": ((rows, length), np.int32), "text_pool": ((rows,), np.int32)}
  label_shape = (num_samples, len(job.class_names)) if job.multi_label else (num_samples,)
  out.update(label=(label_shape, np.int32), group=((num_samples,), np.int8), corrupt=((num_samples,), np.bool_))
  return out


def make_fill_step(graphdef, layer: int | None, mesh, backbone_shardings, prep: data.Preprocessing):
  """(params, backbone, inputs.Decoded) -> the cached arrays of those rows, sharded like the batch: the towers'
  inputs at `layer` (frozen layers only), or the final features (layer None) of the model as it stands."""
  replicated = NamedSharding(mesh, PartitionSpec())
  rows = sharding.batch_sharding(mesh, False)

  def fill(params, backbone, decoded):
    clip = adapters.join(graphdef, {"backbone": backbone, **params}).backbone
    normalized = pipeline.normalize(decoded, prep)
    ids, mask = normalized.input_ids, normalized.attention_mask
    if layer is None:
      return {"vision_features": clip.get_image_features(normalized.pixel_values),
              "text_features": clip.get_text_features(ids, mask)}
    return {"vision_hidden": clip.vision_model.hidden_at(normalized.pixel_values, layer),
            "text_hidden": clip.text_model.hidden_at(ids, mask, layer), "text_mask": mask.astype(jnp.int32),
            "text_pool": clip.text_model.eos_positions(ids).astype(jnp.int32)}

  return jax.jit(fill, in_shardings=(replicated, backbone_shardings, rows), out_shardings=rows)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def prepare(job, params, backbone_shardings, splits: dict[str, data.Dataset], uses: float, log) -> dict:
  """split name -> Cache of each of `splits` (in order; host memory while the budget lasts, then disk), or {} when
  the config's plan is off for rows read `uses` times."""
  cache_plan = plan(job.config, job.settings.adapter, uses)
  # What the pixel store plans for: the cache's build reads each image once; without it, every use does.
  job.image_reads.update(dict.fromkeys(splits, uses if cache_plan is None else 1))
  if cache_plan is None:
    return {}
  fill_step = make_fill_step(job.graphdef, cache_plan.layer, job.mesh, backbone_shardings, job.prep)
  device_budget_left, budget, caches = cache_plan.device_bytes, cache_plan.memory_bytes, {}
  what = "final features" if cache_plan.layer is None else f"inputs of layer {cache_plan.layer}"
  for name, ds in splits.items():
    size = array_files.nbytes(layout(job, cache_plan.layer, len(ds.source)), cache_plan.dtype)
    on_device = size <= device_budget_left
    memory = on_device or size <= budget
    device_budget_left -= size if on_device else 0
    budget -= size if memory and not on_device else 0
    where = "devices" if on_device else "host memory" if memory else "disk"
    log(f"prefix cache of {ds.name}/{name}: the towers' {what}, {size / 2**20:.1f} MiB of {cache_plan.dtype} "
        f"({where})")
    caches[name] = build(job, ds, params, cache_plan, fill_step, memory=memory, log=log, desc=f"caching {name}")
    if on_device:
      caches[name] = to_device(caches[name], job.mesh)
    if caches[name].build_seconds:
      log(f"prefix cache of {ds.name}/{name}: built in {caches[name].build_seconds:.1f} s")
  return caches


def build(job, ds: data.Dataset, params, plan_: Plan, fill_step, *, memory: bool, log, desc: str) -> Cache:
  """The cache of split `ds` under `plan_`: in host memory (`memory`), else reused, completed or (re)built under
  `plan_.root`. Every process takes part (the towers run on the whole mesh) and ends with the whole cache."""
  shapes = layout(job, plan_.layer, len(ds.source))
  cache_key = key(job, ds, plan_.layer, plan_.dtype)
  begin = time.perf_counter()
  if memory:
    arrays = {name: np.zeros(shape, array_files.array_dtype(kind, plan_.dtype))
              for name, (shape, kind) in shapes.items()}
    _fill(job, ds, params, fill_step, arrays, None, cache_key, 0, desc)
    return Cache(arrays, plan_.form, len(ds.source), build_seconds=time.perf_counter() - begin)
  digest = hashlib.sha256(json.dumps(cache_key, sort_keys=True).encode()).hexdigest()[:16]
  layer_name = "features" if plan_.layer is None else f"layer{plan_.layer}"
  files = array_files.Files(plan_.root / f"{ds.name}-{ds.split}-{layer_name}-{digest}", "prefix cache")
  if files.intact(cache_key, shapes, log):
    log(f"prefix cache of {ds.name}/{ds.split}: reusing {files.directory}")
    return Cache(files.open(shapes, plan_.dtype, "r"), plan_.form, len(ds.source), files.directory)
  done = files.batches_done(cache_key, job.config.eval.batch_size)
  if done:
    log(f"prefix cache of {ds.name}/{ds.split}: completing the build in {files.directory}, left off after {done} "
        "batches")
  elif sharding.is_main_process():
    array_files.check_space(files.directory, array_files.nbytes(shapes, plan_.dtype),
                            f"prefix cache of {ds.name}/{ds.split}", SPACE_FIXES)
    files.create(shapes, plan_.dtype)
  _sync(f"prefix cache {files.directory} created")
  _fill(job, ds, params, fill_step, files.open(shapes, plan_.dtype, "r+"), files, cache_key, done, desc)
  _sync(f"prefix cache {files.directory} written")
  if sharding.is_main_process():
    files.finish(cache_key, shapes)
  _sync(f"prefix cache {files.directory} finished")
  log(f"prefix cache of {ds.name}/{ds.split}: written to {files.directory}")
  return Cache(files.open(shapes, plan_.dtype, "r"), plan_.form, len(ds.source), files.directory,
               time.perf_counter() - begin)


def _fill(job, ds, params, fill_step, arrays, files, cache_key, done, desc) -> None:
  """Computes the rows: the dummy (row n), then every sample's present inputs, batch by batch from batch `done`
  (disk: each batch's rows flushed and counted in this process's progress file)."""
  n, batch_size = len(ds.source), job.config.eval.batch_size
  rows_target = sharding.batch_sharding(job.mesh, micro_axis=False)
  activations = [k for k in arrays if k not in ROW_KEYS]

  def run(decoded: inputs.Decoded) -> dict:
    out = fill_step(params, job.params["backbone"], sharding.global_arrays(decoded, rows_target, False))
    return {k: sharding.process_rows(out[k]) for k in activations}

  dummy = pipeline.missing_inputs(job.backbone.tokenizer, job.prep)
  # A whole batch of it: the shape of every other batch, so the towers compile once.
  dummy_rows = run(jax.tree.map(lambda v: np.repeat(v, batch_size // jax.process_count(), axis=0), dummy))
  for k in activations:
    arrays[k][n] = dummy_rows[k][0]
  # Every image is decoded and a corrupt one recorded (its rows are masked where used), whatever the table says.
  it = iter(job.batches(ds.scenario("complete"), batch_size, train=False, skip_corrupt=True))
  if done:
    it.set_state({"next_index": done})
  gather = files is None and jax.process_count() > 1  # in memory on several hosts: each needs every row
  pending = []
  total = -(-n // batch_size) if jax.process_count() == 1 else None
  for count, host in enumerate(console.bar(it, desc=desc, total=total, initial=done, leave=False), done + 1):
    values = {**run(host["inputs"]), **{k: host[k] for k in ("index", *ROW_KEYS)}}
    if gather:
      pending.append(values)
      continue
    _write(arrays, values)
    if files is not None:
      array_files.flush(arrays)
      files.mark(cache_key, batch_size, count)
  if pending:
    _write(arrays, sharding.gather_rows({k: np.concatenate([p[k] for p in pending]) for k in pending[0]}))


def _write(arrays: dict, values: dict) -> None:
  own = values["index"] >= 0
  for name, array in arrays.items():
    array[values["index"][own]] = np.asarray(values[name])[own].astype(array.dtype)


