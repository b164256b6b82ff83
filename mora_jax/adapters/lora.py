"""LoRA (Hu et al. 2021) as in Hugging Face PEFT: y = x K + b + (alpha / r) * dropout(x) A B.

On a CLIP tower every adapted projection is a `LoRALinear`; on a decoder LM it is MokA's decoder layer with a
single modality (`moka.DecoderMokA`: one A that every token uses, no image rows to attend), so that the LoRA
and MokA runs of the multimodal LLM share one layer.
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from mora_jax.adapters import partition
from mora_jax.adapters.common import DECODER, AdapterConfig, Target, call_rngs, dropout, kaiming_uniform_a
from mora_jax.adapters.moka import DecoderMokA, MokAConfig
from mora_jax.models.modeling import Call, Linear


@dataclasses.dataclass(frozen=True)
class LoRAConfig(AdapterConfig):
  name: ClassVar[str] = "lora"
  adapts_decoder: ClassVar[bool] = True
  alpha: float = 8.0  # scale = alpha / rank, as PEFT's lora_alpha

  def adapt(self, base: Linear, target: Target, shared: nnx.Dict, model, *, rngs: nnx.Rngs) -> nnx.Module:
    if target.tower == DECODER:
      # MokA's layer with one modality and its scale after B: LoRA's computation, in the layout of the MokA runs.
      layer = MokAConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout, scale_placement="after_b")
      return DecoderMokA(base, 1, layer, rngs=rngs)
    return LoRALinear(base, target.tower, self, rngs=rngs)


class LoRALinear(nnx.Module):
  """The frozen Linear it wraps (`base`, which `merge` puts back) plus a low-rank branch."""

  def __init__(self, base: Linear, tower: str, cfg: LoRAConfig, *, rngs: nnx.Rngs):
    self.base = base
    self.cfg = cfg
    d_in, d_out = base.kernel.shape
    specific = partition.SPECIFIC[tower]
    self.lora_A = specific(kaiming_uniform_a(rngs.params(), d_in, cfg.rank))
    self.lora_B = specific(jnp.zeros((cfg.rank, d_out), jnp.float32))

  @property
  def scale(self) -> float:
    return self.cfg.alpha / self.cfg.rank

  def delta(self) -> jax.Array:
    """scale * A B: the update of the kernel [in, out]."""
    return self.scale * (self.lora_A[...] @ self.lora_B[...])

  def effective_kernel(self) -> jax.Array:
    return self.base.kernel[...].astype(jnp.float32) + self.delta()

  def __call__(self, x: jax.Array, call: Call | None = None) -> jax.Array:
    y = self.base(x)
    branch = (dropout(x, self.cfg.dropout, call_rngs(call)) @ self.lora_A[...]) @ self.lora_B[...]
    return y + (self.scale * branch).astype(y.dtype)
