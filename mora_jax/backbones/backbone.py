"""The frozen backbone of a run: its weights (placed on the mesh), its tokenizer, and its identity (what a
checkpoint records, so that adapters are never restored onto other weights than they were trained on)."""

import dataclasses
import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import transformers
from flax import nnx
from jax.sharding import Mesh

from mora_jax import sharding
from mora_jax.backbones import embedded
from mora_jax.data import preprocess, tokenizers
from mora_jax.models import modeling as clip_lib
from mora_jax.models.config import CLIPConfig, preset
from mora_jax.models import hf

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str):
  """"auto": bfloat16 on GPU/TPU, float32 on CPU (the MoRA recipe trains in mixed precision on GPUs)."""
  if name == "auto":
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  if name not in DTYPES:
    raise ValueError(f"backbone.dtype={name!r}: use 'auto' or one of {sorted(DTYPES)}.")
  return DTYPES[name]


def weights_hash(tensors: dict[str, np.ndarray]) -> str:
  """sha256 over every tensor's name, dtype, shape and bytes (float32 view, in name order)."""
  digest = hashlib.sha256()
  for key in sorted(tensors):
    array = np.ascontiguousarray(tensors[key], dtype=np.float32)
    digest.update(f"{key}:{array.shape}".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def random_config(preset_name: str, tokenizer: transformers.CLIPTokenizer, max_length: int) -> CLIPConfig:
  """A preset whose text side fits `tokenizer` (vocabulary, special ids) and `max_length` tokens."""
  cfg = preset(preset_name)
  text = dataclasses.replace(cfg.text, vocab_size=len(tokenizer), max_position_embeddings=max_length,
                             eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
  return dataclasses.replace(cfg, text=text)


@dataclasses.dataclass
class Backbone:
  model: clip_lib.CLIP
  tokenizer: transformers.CLIPTokenizer
  identity: dict  # {"source": path or "random:<preset>/seed<s>", "sha256": weights hash}
  image_processing: preprocess.ImageProcessing
  storage_dtype: str = "float32"  # the checkpoint's weights on disk; an export writes the same
  # What transformers' from_pretrained loads these weights from (a Hub id, or a folder: the embedded backbone's is
  # its cache folder, not "embedded"); None for a random preset, which nothing outside this run can load.
  loadable: str | None = None


def storage_dtype(tensors: dict[str, np.ndarray]) -> str:
  """The one dtype of a checkpoint's float tensors (integer buffers such as position_ids aside)."""
  names = {t.dtype.name for t in tensors.values() if t.dtype.kind not in "iub"}
  return names.pop() if len(names) == 1 else "float32"


def image_processing(directory: Path, image_size: int, log=print) -> preprocess.ImageProcessing:
  """The checkpoint's preprocessor_config.json (CLIP's defaults at `image_size` where it has none), checked to
  give the vision tower's input size."""
  path = directory / hf.PREPROCESSOR_FILE
  if not path.is_file():
    log(f"warning: {directory} has no {hf.PREPROCESSOR_FILE}: preprocessing images with OpenAI CLIP's mean, std "
        f"and bicubic resize to {image_size} pixels; if the checkpoint was trained otherwise, add the "
        f"{hf.PREPROCESSOR_FILE} of its image processor (its save_pretrained writes one).")
    return preprocess.ImageProcessing.clip(image_size)
  processing = preprocess.read_image_processing(path)
  if processing.output_size != (image_size, image_size):
    raise ValueError(f"{path} makes images of {processing.output_size or 'varying'} (height, width) pixels, but "
                     f"the vision tower in {directory / hf.CONFIG_FILE} takes {image_size}x{image_size}: fix "
                     "crop_size (or size with do_center_crop false) to match.")
  return processing


def load(cfg: ml_collections.ConfigDict, max_length: int, data_dir: str | Path, *, mesh: Mesh | None,
         rules, log=print) -> Backbone:
  """The configured backbone (`cfg` is the run config's `backbone` section), placed on `mesh` by `rules`.

  path "embedded" is the project's small CLIP pre-trained on easy-VQA, built in `cfg.cache_dir` on first use.
  """
  dtype = compute_dtype(cfg.dtype)
  if cfg.path:
    if cfg.path == embedded.NAME:
      directory = embedded.ensure(cfg.cache_dir, data_dir, cfg.seed, log=log)
    else:
      directory = hf.resolve(cfg.path)
    # Everything that can be refused is checked before the weights are read.
    hf.check_complete(directory, hf.CLIP_TOKENIZER_FILES)
    clip_config = hf.read_config(directory)
    processing = image_processing(directory, clip_config.vision.image_size, log)
    try:
      tokenizer = transformers.CLIPTokenizer.from_pretrained(str(directory))
    except (OSError, TypeError, ValueError) as e:
      raise FileNotFoundError(f"{directory} has no usable CLIP tokenizer ({e}); it needs the vocab.json and "
                              "merges.txt that CLIPTokenizer.save_pretrained writes.") from e
    hf.check_tokenizer_size(tokenizer, clip_config.text.vocab_size, directory)
    tensors, source = hf.read_weights(directory)
    abstract = nnx.eval_shape(lambda: clip_lib.CLIP(clip_config, dtype=dtype, rngs=nnx.Rngs(0)))
    model = hf.load_state_into(abstract, tensors, source, mesh=mesh, rules=rules)
    return Backbone(model, tokenizer, {"source": str(cfg.path), "sha256": weights_hash(tensors)}, processing,
                    storage_dtype(tensors), str(directory) if cfg.path == embedded.NAME else str(cfg.path))
  if not cfg.random_preset:
    raise ValueError("config.backbone: set `path` (a Hugging Face id or checkpoint directory) or "
                     "`random_preset` (a randomly initialised CLIP, e.g. 'tiny').")
  tokenizer = tokenizers.byte_level_clip_tokenizer(Path(data_dir) / "byte_level_tokenizer")
  model = clip_lib.init(random_config(cfg.random_preset, tokenizer, max_length), seed=cfg.seed, dtype=dtype)
  if mesh is not None:
    sharding.shard_module(model, mesh, rules)
  identity = {"source": f"random:{cfg.random_preset}/seed{cfg.seed}",
              "sha256": weights_hash(hf.to_hf_tensors(model))}
  return Backbone(model, tokenizer, identity, preprocess.ImageProcessing.clip(model.config.vision.image_size))
