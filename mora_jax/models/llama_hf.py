"""Hugging Face `LlamaForCausalLM` / `Qwen2ForCausalLM` checkpoints <-> `mora_jax.models.llama`.

The key mapping, layouts, file reading and strictness are `mora_jax.models.hf`'s (as for CLIP): every parameter
comes from exactly one tensor of the right shape and every tensor is used, except `lm_head.weight` of a model
with tied embeddings (some checkpoints store the tied copy).
"""

import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from mora_jax import sharding
from mora_jax.models import hf
from mora_jax.models.llama import LlamaConfig, LlamaForCausalLM

TIED_HEAD = "lm_head.weight"


def read_config(directory: Path) -> LlamaConfig:
  return hf.read_model_config(directory, LlamaConfig.from_hf_dict, "Llama/Qwen2")


def from_pretrained(name_or_path: str | os.PathLike, dtype=jnp.float32, *, mesh: Mesh | None = None,
                    rules=sharding.FSDP_RULES) -> LlamaForCausalLM:
  """Loads a Hugging Face Llama or Qwen2 causal-LM checkpoint (a local directory or a Hub id).

  dtype: storage and matmul dtype of the weights (norms stay float32); mesh/rules: as `hf.from_pretrained`.
  """
  directory = hf.resolve(name_or_path)
  config = read_config(directory)
  tensors, source = hf.read_weights(directory)
  abstract = nnx.eval_shape(lambda: LlamaForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(0)))
  tied = config.tie_word_embeddings
  return hf.load_state_into(abstract, tensors, source, mesh=mesh, rules=rules,
                            ignore=lambda key: tied and key == TIED_HEAD, architecture=config.model_type)


def to_hf_tensors(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
  """The model's parameters as Hugging Face state-dict tensors (torch layout)."""
  if type(model) is not LlamaForCausalLM:  # pylint: disable=unidiomatic-typecheck
    raise TypeError(f"save_pretrained takes a plain mora_jax LlamaForCausalLM, got {type(model).__name__}.")
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  to_hf_layout = hf._to_hf_layout  # pylint: disable=protected-access  (the one layout rule, shared with CLIP)
  tensors = {hf.hf_key(path): np.array(to_hf_layout(str(path[-1]), sharding.host_numpy(v.get_value())), order="C")
             for path, v in flat}
  # Linear kernels were found by leaf name; an adapted (wrapped) projection would have a longer path.
  unexpected = [k for k in tensors if ".base." in k]
  if unexpected:
    raise TypeError(f"the model holds adapter parameters ({unexpected[:3]}); save the frozen LM only.")
  return tensors


def save_pretrained(model: LlamaForCausalLM, out_dir: str | os.PathLike, dtype: str | None = None) -> Path:
  """Writes config.json + model.safetensors that transformers' LlamaForCausalLM / Qwen2ForCausalLM loads.
  Every process must call it (sharded arrays are gathered); only process 0 writes."""
  return hf.write_checkpoint(to_hf_tensors(model), model.config.to_hf_dict(), out_dir, dtype)
