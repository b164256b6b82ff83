"""Missing-modality tables (docs/protocol.md): one code per base sample, 0 complete, 1 text missing, 2 image missing.

Tables are built once per (split, type, rate, seed), cached next to the data as .npy, and reused by every
method. A provided table (the authors' published `.pt` files under their names, or a table under the
project's name) is used instead when present, read without torch (`read_torch_tensor`). Entry i of a table is
the code of source row i (the authors' Arrow row, or the raw layout's split-file order).
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
  """docs/protocol.md's construction: int(N * rate) distinct samples lose a modality; for "both", half of those
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


# The authors name their datasets and splits differently: mmimdb / food101 / hatememes, train / val / test.
AUTHORS_DATASETS = {"mm_imdb": "mmimdb", "upmc_food101": "food101", "hateful_memes": "hatememes"}
AUTHORS_SPLITS = {"train": "train", "validation": "val", "test": "test"}


def rate_name(rate: float) -> str:
  """The rate as Python prints a float (0.7, 1.0), which is how the authors' file names write it."""
  return str(float(rate))


def provided_table_names(dataset: str, split: str, missing: Missing) -> list[str]:
  """File names under which a table someone else made is looked for, in this order: the authors' name
  (`<mmimdb|food101|hatememes>_split<train|val|test>_missing_<type>_<rate>.pt`), then the project's name
  (`<dataset>_<split>_missing_<type>_<rate>.pt` or `.npy`, with this library's dataset and split names)."""
  names = []
  if dataset in AUTHORS_DATASETS and split in AUTHORS_SPLITS:
    names.append(f"{AUTHORS_DATASETS[dataset]}_split{AUTHORS_SPLITS[split]}_missing_{missing.type}_"
                 f"{rate_name(missing.rate)}.pt")
  project = f"{dataset}_{split}_missing_{missing.type}_{rate_name(missing.rate)}"
  return names + [f"{project}.pt", f"{project}.npy"]


def generated_table_name(dataset: str, split: str, missing: Missing) -> str:
  return f"{dataset}_{split}_missing_{missing.type}_{rate_name(missing.rate)}_seed{missing.seed}.npy"


@dataclasses.dataclass(frozen=True)
class Table:
  """A split's codes (one per base sample, in the source's row order) and where they came from."""
  codes: np.ndarray
  path: Path
  seed: int | None  # the seed it was generated from here (now or by an earlier run); None for a provided table

  def describe(self) -> str:
    if self.seed is None:
      return f"provided table {self.path}"
    return f"generated from seed {self.seed}, cached at {self.path}"


def _read(path: Path) -> np.ndarray:
  return np.load(path) if path.suffix == ".npy" else read_torch_tensor(path)


def _checked(values: np.ndarray, path: Path, split: str, num_samples: int, generated: bool) -> np.ndarray:
  """Codes 0/1/2, one per sample; anything else is an error naming the file (never a silent rebuild)."""
  fix = ("Delete it to rebuild it from the seed." if generated else
         "It was made for another version of this split (rows are matched by position: entry i is source row "
         "i); use the table that belongs to these files, or remove it to have one generated from the seed.")
  if values.shape != (num_samples,):
    raise ValueError(f"{path}: a missing table for the {num_samples} {split} samples was expected, got shape "
                     f"{values.shape}. {fix}")
  codes = values.astype(np.int8)
  if not (np.array_equal(codes, values) and np.isin(codes, (COMPLETE, TEXT_MISSING, IMAGE_MISSING)).all()):
    bad = sorted(set(values[~np.isin(values, (COMPLETE, TEXT_MISSING, IMAGE_MISSING))].tolist()))
    raise ValueError(f"{path}: missing codes must be 0 (complete), 1 (text missing) or 2 (image missing); it "
                     f"holds {bad[:5]}. {fix}")
  return codes


def load_or_build(cache_dir: Path, dataset: str, split: str, num_samples: int, missing: Missing) -> Table:
  """A provided table in `cache_dir` (`provided_table_names`, first found), else the table generated from
  the seed and cached there by an earlier run, else a new one (then cached)."""
  cache_dir = Path(cache_dir)
  for name in provided_table_names(dataset, split, missing):
    path = cache_dir / name
    if path.is_file():
      return Table(_checked(_read(path), path, split, num_samples, generated=False), path, seed=None)
  path = cache_dir / generated_table_name(dataset, split, missing)
  if path.is_file():
    return Table(_checked(np.load(path), path, split, num_samples, generated=True), path, missing.seed)
  codes = build_table(num_samples, missing)
  cache_dir.mkdir(parents=True, exist_ok=True)
  np.save(path, codes)
  return Table(codes, path, missing.seed)


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
