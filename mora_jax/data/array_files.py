"""A folder of memory-mapped .npy arrays that is built once and reused: keyed by everything its values depend on,
optionally built with per-process progress files (so that an interrupted build is completed), finished by a meta
file written last that records each file's size and CRC-32, and checked against it before any reuse (a damaged or
unfinished folder is rebuilt).
The prefix-activation cache (mora_jax/train/prefix_cache.py) and the pixel store (pixel_store.py) are such folders.

A layout maps each array's name to (shape, kind): kind is a numpy dtype, or "act" for the dtype the folder is
opened with (the prefix cache's activations).
"""

import json
import shutil
import zlib
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

META_FILE = "cache.json"  # written last: a folder without it is an unfinished build
CHECKSUM_BLOCK = 64 << 20


class SpaceError(ValueError):
  """Too little disk space for a folder where it is configured; the message says the fixes."""


def file_dtype(dtype: np.dtype) -> np.dtype:
  # numpy's .npy format has no bfloat16: such arrays are stored as their uint16 bits.
  return np.dtype(np.uint16) if dtype == ml_dtypes.bfloat16 else dtype


def array_dtype(kind, dtype: np.dtype) -> np.dtype:
  return dtype if kind == "act" else np.dtype(kind)


def checksum(path: Path) -> str:
  crc = 0
  with open(path, "rb") as f:
    while block := f.read(CHECKSUM_BLOCK):
      crc = zlib.crc32(block, crc)
  return f"{crc:08x}"


def nbytes(layout: dict, dtype: np.dtype = np.dtype(np.float32)) -> int:
  return sum(int(np.prod(shape)) * array_dtype(kind, dtype).itemsize for shape, kind in layout.values())


def free_bytes(directory: Path) -> int:
  """Free space on the filesystem that holds (or would hold) `directory`."""
  existing = directory
  while not existing.exists():
    existing = existing.parent
  return shutil.disk_usage(existing).free


def check_space(directory: Path, needed: int, what: str, fixes: str) -> None:
  free = free_bytes(directory)
  if needed > free:
    raise SpaceError(f"the {what} needs {needed / 2**30:.2f} GiB in {directory}, but only {free / 2**30:.2f} GiB "
                     f"are free there: {fixes}")


def flush(arrays: dict) -> None:
  for array in arrays.values():
    if isinstance(array, np.memmap):
      array.flush()


class Files:
  """One folder: a .npy per array, progress files while building, META_FILE once complete. `what` names the
  folder's kind in warnings ("prefix cache", "pixel store")."""

  def __init__(self, directory: Path, what: str):
    self.directory, self.what = directory, what

  def path(self, name: str) -> Path:
    return self.directory / f"{name}.npy"

  def progress_path(self, process: int) -> Path:
    return self.directory / f"progress-{process}-of-{jax.process_count()}.json"

  def meta(self) -> dict | None:
    try:
      return json.loads((self.directory / META_FILE).read_text())
    except (OSError, ValueError):
      return None

  def batches_done(self, key: dict, batch_size: int) -> int:
    """Batches every process finished in an earlier, interrupted build of the same key and layout (0: none)."""
    done = []
    for process in range(jax.process_count()):
      try:
        record = json.loads(self.progress_path(process).read_text())
      except (OSError, ValueError):
        return 0
      if record.get("key") != key or record.get("batch_size") != batch_size:
        return 0
      done.append(int(record["batches"]))
    return min(done)

  def mark(self, key: dict, batch_size: int, batches: int) -> None:
    self.progress_path(jax.process_index()).write_text(
        json.dumps({"key": key, "batch_size": batch_size, "batches": batches}))

  def open(self, layout: dict, dtype: np.dtype, mode: str) -> dict[str, np.ndarray]:
    arrays = {}
    for name, (shape, kind) in layout.items():
      stored = file_dtype(array_dtype(kind, dtype))
      if mode == "w+":
        arrays[name] = np.lib.format.open_memmap(self.path(name), mode="w+", dtype=stored, shape=shape)
      else:
        arrays[name] = np.load(self.path(name), mmap_mode=mode)
      if array_dtype(kind, dtype) == ml_dtypes.bfloat16:
        arrays[name] = arrays[name].view(ml_dtypes.bfloat16)
    return arrays

  def intact(self, key: dict, layout: dict, log) -> bool:
    """Whether a finished folder of `key` is here with every file as written (sizes and checksums)."""
    meta = self.meta()
    if meta is None:
      return False
    if meta.get("key") != key:
      log(f"warning: {self.directory} holds a {self.what} of another key; rebuilding it")
      return False
    for name in layout:
      path = self.path(name)
      expected = meta["files"].get(name)
      if not path.is_file() or expected is None or path.stat().st_size != expected["bytes"] \
          or checksum(path) != expected["crc32"]:
        log(f"warning: {self.what} file {path} is damaged (its checksum or size differs from {META_FILE}'s); "
            f"rebuilding the {self.what}")
        return False
    return True

  def create(self, layout: dict, dtype: np.dtype) -> None:
    """An empty folder with every array allocated (an older folder of that name is deleted first)."""
    if self.directory.exists():
      shutil.rmtree(self.directory)
    self.directory.mkdir(parents=True)
    self.open(layout, dtype, "w+")

  def finish(self, key: dict, layout: dict) -> None:
    files = {name: {"bytes": self.path(name).stat().st_size, "crc32": checksum(self.path(name))} for name in layout}
    (self.directory / META_FILE).write_text(json.dumps({"key": key, "files": files}, indent=2) + "\n")
    for process in range(jax.process_count()):
      self.progress_path(process).unlink(missing_ok=True)
