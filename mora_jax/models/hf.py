"""Hugging Face CLIP checkpoints <-> `mora_jax.models.modeling.CLIP`.

Loading is strict: every parameter of our model must come from exactly one checkpoint tensor of the right
shape, and every checkpoint tensor must be used (old `position_ids` buffers excepted). Any violation is
one `WeightsError` that names the file and the keys.
"""

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx
from jax.sharding import Mesh

from mora_jax import sharding
from mora_jax.models.modeling import CLIP
from mora_jax.models.config import CLIPConfig

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
_WEIGHT_FILES = (SAFETENSORS_FILE, SAFETENSORS_INDEX_FILE, TORCH_FILE)
PREPROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", PREPROCESSOR_FILE)
# The file sets from which transformers 5 builds a model's tokenizer, any one of them enough: CLIPTokenizer reads
# tokenizer.json or vocab.json + merges.txt (as Qwen2's does); Llama's also reads a sentencepiece tokenizer.model.
CLIP_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
LM_TOKENIZER_FILES = (*CLIP_TOKENIZER_FILES, ("tokenizer.model",))

# Our leaf name -> Hugging Face's. Leaves not listed (class_embedding, logit_scale) keep their name.
_HF_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


class WeightsError(ValueError):
  """Hugging Face weights (a checkpoint directory's files) that cannot be read or do not match the model; the
  message names file and keys. (Orbax training checkpoints are mora_jax.train.checkpoint's.)"""


def hf_key(path: Sequence) -> str:
  """('text_model', 'encoder', 'layers', 0, 'self_attn', 'q_proj', 'kernel') -> '...q_proj.weight'."""
  *modules, leaf = (str(p) for p in path)
  return ".".join([*modules, _HF_LEAF.get(leaf, leaf)])


def _from_hf_layout(leaf: str, array: np.ndarray) -> np.ndarray:
  if leaf != "kernel":
    return array
  # torch Linear weight [out, in] -> [in, out]; Conv2d weight OIHW -> HWIO.
  return array.T if array.ndim == 2 else array.transpose(2, 3, 1, 0)


def _to_hf_layout(leaf: str, array: np.ndarray) -> np.ndarray:
  if leaf != "kernel":
    return array
  return array.T if array.ndim == 2 else array.transpose(3, 2, 0, 1)


def _limited(keys: Sequence[str], limit: int = 10) -> str:
  keys = sorted(keys)
  more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
  return ", ".join(keys[:limit]) + more


# ----------------------------------------------------------------------------------------------- reading


def resolve(name_or_path: str | os.PathLike) -> Path:
  """A local checkpoint directory, or a Hub repo id fetched through the Hugging Face cache."""
  path = Path(name_or_path).expanduser()
  if path.is_dir():
    return path
  text = str(name_or_path)
  if path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
    raise FileNotFoundError(f"{text} is not a checkpoint directory. Pass a directory holding {CONFIG_FILE} and "
                            f"{SAFETENSORS_FILE} (as transformers' save_pretrained writes), or a Hub id such "
                            "as openai/clip-vit-base-patch16.")
  return _download(text)


def _download(repo_id: str) -> Path:
  from huggingface_hub import errors, hf_hub_download  # pylint: disable=import-outside-toplevel
  try:
    directory = Path(hf_hub_download(repo_id, CONFIG_FILE)).parent
  except Exception as e:  # offline, unknown repo, no cache: all mean the same to the user
    raise FileNotFoundError(
        f"{repo_id!r} is not a local directory and could not be fetched from the Hugging Face Hub or its cache "
        f"({type(e).__name__}: {e}). Download it where the Hub is reachable (it is then cached), or pass a "
        "local directory.") from e
  for name in _WEIGHT_FILES:
    try:
      hf_hub_download(repo_id, name)
    except errors.EntryNotFoundError:
      continue
    if name == SAFETENSORS_INDEX_FILE:
      for shard in sorted(set(json.loads((directory / name).read_text())["weight_map"].values())):
        hf_hub_download(repo_id, shard)
    for optional in PROCESSOR_FILES:  # training reads the checkpoint's own tokenizer and image preprocessing
      try:
        hf_hub_download(repo_id, optional)
      except errors.EntryNotFoundError:
        pass
    return directory
  raise FileNotFoundError(f"Hub repo {repo_id!r} has none of {_WEIGHT_FILES}.")


def check_complete(directory: Path, tokenizer_files: Sequence[Sequence[str]]) -> None:
  """Refuses, before anything is read, a checkpoint directory without config.json, weights, or tokenizer files:
  transformers builds a near-empty tokenizer from a directory without the latter instead of failing, which would
  turn every text into nothing."""
  def has(names: Sequence[str]) -> bool:
    return all((directory / name).is_file() for name in names)

  missing = [CONFIG_FILE] if not has([CONFIG_FILE]) else []
  if not any(has([name]) for name in _WEIGHT_FILES):
    missing.append(" or ".join(_WEIGHT_FILES))
  if not any(has(names) for names in tokenizer_files):
    missing.append("tokenizer files (" + " or ".join(" + ".join(names) for names in tokenizer_files) + ")")
  if missing:
    raise FileNotFoundError(f"{directory} is an incomplete checkpoint: it lacks {'; '.join(missing)}. Copy them from "
                            "the checkpoint it came from (save_pretrained of the model and of its tokenizer writes "
                            "them), or pass the Hub id.")


def check_tokenizer_size(tokenizer, vocab_size: int, directory: Path) -> None:
  """Refuses a tokenizer with fewer than half the model's vocab_size tokens (real ones differ by padding only)."""
  if 2 * len(tokenizer) < vocab_size:
    raise ValueError(f"{directory}: its tokenizer has {len(tokenizer)} tokens but the model's vocab_size in "
                     f"{CONFIG_FILE} is {vocab_size}: the tokenizer files are damaged or not this model's. Copy them "
                     "from the checkpoint the weights came from.")


def read_config(directory: Path) -> CLIPConfig:
  return read_model_config(directory, CLIPConfig.from_hf_dict, "CLIP")


def read_model_config(directory: Path, from_hf_dict, family: str):
  """`from_hf_dict` of the checkpoint's config.json; errors name the file and the model family."""
  path = directory / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: a {family} checkpoint directory needs the {CONFIG_FILE} that "
                            "transformers' save_pretrained writes.")
  try:
    return from_hf_dict(json.loads(path.read_text()))
  except (json.JSONDecodeError, ValueError, TypeError) as e:
    raise WeightsError(f"{path}: not a {family} config this library implements ({e}).") from e


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
  try:
    return safetensors.numpy.load_file(path)
  except (safetensors.SafetensorError, OSError, ValueError) as e:
    raise WeightsError(f"{path} is not a readable safetensors file ({e}). It is probably truncated or "
                          "corrupt: download or save it again.") from e


def _read_torch(path: Path) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise WeightsError(f"{path} is a PyTorch pickle and reading it needs torch, which is not installed. "
                          "Install torch, or convert the checkpoint to model.safetensors.") from e
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for a bad pickle
    raise WeightsError(f"{path} is not a readable PyTorch checkpoint ({e}).") from e
  return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()}


def read_weights(directory: Path) -> tuple[dict[str, np.ndarray], Path]:
  """All tensors of a checkpoint directory (safetensors preferred), and the file they came from."""
  if (directory / SAFETENSORS_FILE).is_file():
    path = directory / SAFETENSORS_FILE
    return _read_safetensors(path), path
  if (directory / SAFETENSORS_INDEX_FILE).is_file():
    path = directory / SAFETENSORS_INDEX_FILE
    try:
      shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError) as e:
      raise WeightsError(f"{path}: not a valid safetensors index ({e}).") from e
    tensors = {}
    for shard in shards:
      tensors.update(_read_safetensors(directory / shard))
    return tensors, path
  if (directory / TORCH_FILE).is_file():
    path = directory / TORCH_FILE
    return _read_torch(path), path
  raise FileNotFoundError(f"{directory} holds no weights: expected one of {', '.join(_WEIGHT_FILES)}.")


def _old_buffer(key: str) -> bool:
  return key.endswith("position_ids")


def load_state_into(abstract: nnx.Module, tensors: dict[str, np.ndarray], source: Path, *, mesh: Mesh | None = None,
                    rules=sharding.FSDP_RULES, ignore: Callable[[str], bool] = _old_buffer,
                    architecture: str = "CLIP") -> nnx.Module:
  """Fills the abstract (eval_shape) `abstract` model with `tensors`; strict about keys and shapes. Checkpoint
  keys for which `ignore` is true may be left unused (buffers, weights tied to others); `architecture` names the
  model in errors."""
  graphdef, state = nnx.split(abstract)
  flat = nnx.to_flat_state(state)
  missing, mismatched, used = [], [], set()
  for path, variable in flat:
    key = hf_key(path)
    if key not in tensors:
      missing.append(key)
      continue
    used.add(key)
    array = _from_hf_layout(str(path[-1]), tensors[key])
    expected = variable.get_value()
    if array.shape != expected.shape:
      hf_shape = _to_hf_layout(str(path[-1]), np.empty(expected.shape, np.uint8)).shape
      mismatched.append(f"{key}: checkpoint {tensors[key].shape}, model expects {hf_shape}")
      continue
    target = None if mesh is None else sharding.variable_sharding(variable, mesh, rules)
    array = array.astype(expected.dtype)
    variable.set_value(jnp.asarray(array) if target is None else sharding.place(array, target))
  unused = [k for k in tensors if k not in used and not ignore(k)]
  problems = []
  if missing:
    problems.append(f"missing keys: {_limited(missing)}")
  if unused:
    problems.append(f"unused keys (not part of this {architecture} config): {_limited(unused)}")
  if mismatched:
    problems.append(f"shape mismatches: {_limited(mismatched)}")
  if problems:
    raise WeightsError(f"{source} does not match the {architecture} config in {source.parent / CONFIG_FILE}: "
                          + "; ".join(problems) + ".")
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def from_pretrained(name_or_path: str | os.PathLike, dtype=jnp.float32, *, mesh: Mesh | None = None,
                    rules=sharding.FSDP_RULES) -> CLIP:
  """Loads a Hugging Face CLIP checkpoint (local directory or Hub id).

  Args:
    name_or_path: directory with config.json and model.safetensors (or pytorch_model.bin, which needs torch),
      or a Hub repo id, resolved through the Hugging Face cache.
    dtype: storage and matmul dtype of the weights; LayerNorm parameters and math stay float32.
    mesh: if given, every weight is placed on it according to `rules` (e.g. FSDP over a "fsdp" axis).
    rules: logical-axis rules of `mora_jax.sharding`.
  """
  directory = resolve(name_or_path)
  config = read_config(directory)
  tensors, source = read_weights(directory)
  abstract = nnx.eval_shape(lambda: CLIP(config, dtype=dtype, rngs=nnx.Rngs(0)))
  return load_state_into(abstract, tensors, source, mesh=mesh, rules=rules)


# ----------------------------------------------------------------------------------------------- writing


def to_hf_tensors(model: CLIP) -> dict[str, np.ndarray]:
  """The model's parameters as Hugging Face state-dict tensors (torch layout)."""
  if type(model) is not CLIP:  # pylint: disable=unidiomatic-typecheck
    raise TypeError(f"save_pretrained takes a plain mora_jax CLIP, got {type(model).__name__}; merge adapters "
                    "into the backbone first.")
  # np.array(order="C"), not np.ascontiguousarray, which turns the 0-d logit_scale into shape [1].
  return {hf_key(path): np.array(_to_hf_layout(str(path[-1]), sharding.host_numpy(v.get_value())), order="C")
          for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def save_pretrained(model: CLIP, out_dir: str | os.PathLike, dtype: str | None = None) -> Path:
  """Writes config.json + model.safetensors that `transformers.CLIPModel.from_pretrained` loads, the weights
  in `dtype` (e.g. "bfloat16"; default: the model's).

  Every process must call it (arrays sharded across hosts are gathered); only process 0 writes.
  """
  return write_checkpoint(to_hf_tensors(model), model.config.to_hf_dict(), out_dir, dtype)


def write_checkpoint(tensors: dict[str, np.ndarray], config: dict, out_dir: str | os.PathLike,
                     dtype: str | None = None) -> Path:
  """config.json and model.safetensors (`tensors` cast to `dtype` if given), written by process 0."""
  if dtype is not None:
    tensors = {k: v.astype(dtype) for k, v in tensors.items()}
  out = Path(out_dir)
  if jax.process_index() == 0:
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    safetensors.numpy.save_file(tensors, out / SAFETENSORS_FILE, metadata={"format": "pt"})
  return out
