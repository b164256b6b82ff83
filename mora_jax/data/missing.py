"""Missing-modality tables (PROTOCOL.md): one code per base sample, 0 complete, 1 text missing, 2 image missing.

Tables are built once per (split, type, rate, seed), cached next to the data as .npy, and reused by every
method. The authors' published `.pt` tables are read when present, without torch (`read_torch_tensor`).
"""

import dataclasses
import pickle
import zipfile
from pathlib import Path

import numpy as np

COMPLETE, TEXT_MISSING, IMAGE_MISSING = 0, 1, 2
TYPES = ("text", "image", "both")


@dataclasses.dataclass(frozen=True)
class Missing:
  """Which modality goes missing (`type`) and for what fraction of samples (`rate`)."""
  rate: float = 0.7
  type: str = "both"
  seed: int = 0

  def __post_init__(self):
    if self.type not in TYPES:
      raise ValueError(f"missing type {self.type!r}: use one of {TYPES}.")
    if not 0.0 <= self.rate <= 1.0:
      raise ValueError(f"missing rate {self.rate} must be in [0, 1].")


def build_table(num_samples: int, missing: Missing) -> np.ndarray:
  """PROTOCOL.md's construction: int(N * rate) distinct samples lose a modality; for "both", half of those
  (int(k * 0.5)) lose the image and the rest the text."""
  rng = np.random.default_rng(missing.seed)
  table = np.zeros(num_samples, np.int8)
  chosen = rng.choice(num_samples, int(num_samples * missing.rate), replace=False)
  if missing.type == "image":
    table[chosen] = IMAGE_MISSING
    return table
  table[chosen] = TEXT_MISSING
  if missing.type == "both":
    table[rng.choice(chosen, int(len(chosen) * 0.5), replace=False)] = IMAGE_MISSING
  return table


def _rate_name(rate: float) -> str:
  return f"{rate:g}"


def authors_table_name(dataset: str, split: str, missing: Missing) -> str:
  """`<dataset>_split<split>_missing_<type>_<rate>.pt`, as the authors publish them."""
  return f"{dataset}_split{split}_missing_{missing.type}_{_rate_name(missing.rate)}.pt"


def load_or_build(cache_dir: Path, dataset: str, split: str, num_samples: int, missing: Missing) -> np.ndarray:
  """The authors' `.pt` table if it is in `cache_dir`, else our cached table, else a new one (then cached)."""
  cache_dir = Path(cache_dir)
  authors = cache_dir / authors_table_name(dataset, split, missing)
  if authors.is_file():
    table = read_torch_tensor(authors).astype(np.int8)
  else:
    ours = cache_dir / f"{dataset}_{split}_missing_{missing.type}_{_rate_name(missing.rate)}_seed{missing.seed}.npy"
    if ours.is_file():
      table = np.load(ours)
    else:
      table = build_table(num_samples, missing)
      cache_dir.mkdir(parents=True, exist_ok=True)
      np.save(ours, table)
    authors = ours
  if table.shape != (num_samples,) or not np.isin(table, (COMPLETE, TEXT_MISSING, IMAGE_MISSING)).all():
    raise ValueError(f"{authors}: a missing table for {num_samples} {split} samples with codes 0/1/2 was "
                     f"expected, got shape {table.shape} and codes {sorted(set(table.tolist()))[:5]}. Delete it "
                     "to rebuild, or fix its source.")
  return table


# --------------------------------------------------------------------------- torch .pt files without torch

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:

  def __init__(self, name: str):
    if name not in _STORAGE_DTYPES:
      raise pickle.UnpicklingError(f"unsupported torch storage {name}")
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage, offset, size, stride, *_):
  itemsize = storage.dtype.itemsize
  return np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                         strides=tuple(s * itemsize for s in stride)).copy()


class _TensorUnpickler(pickle.Unpickler):
  """Allows exactly what a saved tensor needs: tensor rebuilding, storage types, and OrderedDict."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
    super().__init__(file)
    self.archive, self.prefix = archive, prefix

  def find_class(self, module, name):
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return _rebuild_tensor
    if module == "torch":
      return _StorageType(name)
    if (module, name) == ("collections", "OrderedDict"):
      import collections  # pylint: disable=import-outside-toplevel
      return collections.OrderedDict
    raise pickle.UnpicklingError(f"a tensor file should not reference {module}.{name}")

  def persistent_load(self, pid):
    _, storage_type, key, _, _ = pid
    data = self.archive.read(f"{self.prefix}/data/{key}")
    return np.frombuffer(data, storage_type.dtype)


def read_torch_tensor(path: Path) -> np.ndarray:
  """The tensor stored by `torch.save(tensor, path)` (zip format, torch >= 1.6) as a numpy array."""
  try:
    with zipfile.ZipFile(path) as archive:
      pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
      if len(pickles) != 1:
        raise ValueError("no data.pkl inside")
      prefix = pickles[0][:-len("/data.pkl")]
      with archive.open(pickles[0]) as file:
        result = _TensorUnpickler(file, archive, prefix).load()
  except (zipfile.BadZipFile, pickle.UnpicklingError, ValueError, KeyError, EOFError) as e:
    raise ValueError(f"{path} is not a torch.save'd tensor this reader understands ({e}).") from e
  if not isinstance(result, np.ndarray):
    raise ValueError(f"{path} holds a {type(result).__name__}, not a single tensor.")
  return result
