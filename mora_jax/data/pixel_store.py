"""Every image decoded once: the pixel store.

The protocol has no augmentation, so a sample's model pixels (decoded, RGB, resized, cropped: uint8 [H, W, 3],
before the normalisation the devices do) are the same every epoch and in every run with the same preprocessing.
A split's store holds them for all its samples (row i for sample i) with a `corrupt` flag per row, in
memory-mapped files under `<data_dir>/pixel_store/` (a filesystem all hosts see, like the prepared data), keyed
by the dataset, split, sample count and preprocessing. It is built once, on process 0, by `workers` decoding
processes with a progress bar; later runs (training, evaluation, the prefix cache's build) read rows instead of
decoding. Like the prefix cache (mora_jax/data/array_files.py), a store is checked before reuse: a truncated or
damaged one is rebuilt with a one-line notice, as is one whose build was interrupted.

Config: pixel_store "auto" (an existing store is read; one is built when the run reads a split's images more than
once, i.e. trains or validates more than one epoch without the prefix cache, or tests scenario by scenario, and
it fits the disk with HEADROOM_BYTES to spare) | "on" | "off".
"""

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np

from mora_jax import console
from mora_jax.data import array_files
from mora_jax.data import pipeline

MODES = ("auto", "on", "off")
FORMAT_VERSION = 2  # 2: 16-bit images are rescaled to 8 bits (clipped to 255 before)
HEADROOM_BYTES = 1 << 30  # "auto" leaves this much of the disk free
BUILD_CHUNK = 32  # images a worker decodes per task of the build


@dataclasses.dataclass(frozen=True)
class PixelStore:
  """One split's decoded images: `pixels` uint8 [n, H, W, 3] and `corrupt` bool [n], memory-mapped."""
  pixels: np.ndarray
  corrupt: np.ndarray
  directory: Path
  build_seconds: float = 0.0  # what building it took this run (0: reused)


def key(name: str, split: str, num_samples: int, prep: pipeline.Preprocessing, sources: str = "") -> dict:
  """Everything a store's values depend on (a different key is a different store). `sources`: the fingerprint of
  the raw files a published dataset was prepared from (data.image_check), which its fixed name does not carry."""
  store_key = {"format": FORMAT_VERSION, "dataset": name, "split": split, "samples": num_samples,
               "image": json.loads(json.dumps(dataclasses.asdict(prep.image), default=str)),
               "transparency": prep.transparency}
  return {**store_key, "sources": sources} if sources else store_key  # the stores of before stay valid


def layout(num_samples: int, prep: pipeline.Preprocessing) -> dict:
  height, width = prep.image.output_size
  return {"pixels": ((num_samples, height, width, 3), np.uint8), "corrupt": ((num_samples,), np.bool_)}


def files(root: Path, name: str, split: str, store_key: dict, prep: pipeline.Preprocessing) -> array_files.Files:
  digest = hashlib.sha256(json.dumps(store_key, sort_keys=True).encode()).hexdigest()[:16]
  height, width = prep.image.output_size
  return array_files.Files(Path(root).expanduser() / f"{name}-{split}-{height}x{width}-{digest}", "pixel store")


def open_existing(folder: array_files.Files, store_key: dict, shapes: dict, log) -> PixelStore | None:
  """The intact store in `folder`, or None (absent, unfinished, of another key, or damaged: said in `log`)."""
  if not folder.intact(store_key, shapes, log):
    return None
  arrays = folder.open(shapes, np.dtype(np.uint8), "r")
  return PixelStore(arrays["pixels"], arrays["corrupt"], folder.directory)


def _build(source, where: str, prep: pipeline.Preprocessing, folder: array_files.Files, store_key: dict,
           shapes: dict, workers: int, log) -> PixelStore:
  """Decodes every image of `source` (a split's records) into a new store in `folder`, over `workers` processes
  (0: this one), with a progress bar; a corrupt image's row is flagged, and its pixels left zero."""
  begin = time.perf_counter()
  array_files.check_space(folder.directory, array_files.nbytes(shapes), f"pixel store of {where}",
                          "free space, point --config.data_dir at a larger disk, or decode every epoch instead "
                          "with --config.pixel_store=off.")
  folder.create(shapes, np.dtype(np.uint8))
  arrays = folder.open(shapes, np.dtype(np.uint8), "r+")
  chunks = ([(source[i]["image"], pipeline.sample_name(source[i], where))
             for i in range(start, min(start + BUILD_CHUNK, len(source)))]
            for start in range(0, len(source), BUILD_CHUNK))
  decoded = pipeline.decode_stream(chunks, prep, workers)
  for index, out in enumerate(console.bar(decoded, total=len(source), desc=f"decoding {where} once", unit="image",
                                           leave=False)):
    if isinstance(out, str):
      arrays["corrupt"][index] = True
    else:
      arrays["pixels"][index] = out
  array_files.flush(arrays)
  folder.finish(store_key, shapes)
  arrays = folder.open(shapes, np.dtype(np.uint8), "r")  # just checksummed by `finish`: not verified again
  seconds = time.perf_counter() - begin
  log(f"pixel store of {where}: {len(source)} images decoded in {seconds:.1f} s with {workers} worker "
      f"process(es), {int(arrays['corrupt'].sum())} corrupt; written to {folder.directory}")
  return PixelStore(arrays["pixels"], arrays["corrupt"], folder.directory, seconds)


def open_or_build(source, name: str, split: str, prep: pipeline.Preprocessing, root: Path, mode: str, workers: int,
                  log, uses: float = 2.0) -> PixelStore | None:
  """The store of a split: reused when intact, else built ("on"; "auto" when this run reads each image more than
  once (`uses`: passes over the split) and it `fits`), else None ("off"; "auto" reading once, where building
  costs what it saves; "auto" without the disk space, as `log` notes): the pipeline then decodes."""
  if mode not in MODES:
    raise ValueError(f"config.pixel_store={mode!r}: use one of {MODES}.")
  if mode == "off" or len(source) == 0:
    return None
  store_key = key(name, split, len(source), prep, getattr(source, "sources", ""))
  shapes = layout(len(source), prep)
  folder = files(root, name, split, store_key, prep)
  store = open_existing(folder, store_key, shapes, log)
  if store is not None or (mode == "auto" and uses <= 1):
    return store
  size = array_files.nbytes(shapes)
  if mode == "auto" and size + HEADROOM_BYTES > array_files.free_bytes(Path(root).expanduser()):
    log(f"note: no pixel store for {name}/{split}: its {size / 2**30:.2f} GiB would leave less than "
        f"{HEADROOM_BYTES / 2**30:.0f} GiB free under {root}; images are decoded every epoch")
    return None
  return _build(source, f"{name}/{split}", prep, folder, store_key, shapes, workers, log)
