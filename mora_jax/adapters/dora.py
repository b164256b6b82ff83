"""DoRA (Liu et al. 2024) exactly as Hugging Face PEFT computes it (peft/tuners/lora/dora.py).

Per output feature o: m_o / ||K[:, o] + s (A B)[:, o]|| rescales the adapted weight, where the norm is
detached from the graph (PEFT, following the paper's section 4.3) and A B inside it too. With dropout p > 0
in training, PEFT keeps the frozen path on the clean input and applies the rescaling to the dropped one:
y = x K + b + (m/n - 1) * (x~ K) + (m/n) * s * (x~ A B). Without dropout that is (m/n) (x K + s x A B) + b.
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from mora_jax.adapters import partition
from mora_jax.adapters.common import AdapterConfig, Target, call_rngs, dropout
from mora_jax.adapters.lora import LoRALinear
from mora_jax.models.modeling import Call, Linear


@dataclasses.dataclass(frozen=True)
class DoRAConfig(AdapterConfig):
  name: ClassVar[str] = "dora"
  alpha: float = 8.0  # scale = alpha / rank, as PEFT's lora_alpha

  def adapt(self, base: Linear, target: Target, shared: nnx.Dict, model, *, rngs: nnx.Rngs) -> nnx.Module:
    return DoRALinear(base, target.tower, self, rngs=rngs)


class DoRALinear(LoRALinear):
  """LoRA's factors plus a trained magnitude per output feature."""

  def __init__(self, base: Linear, tower: str, cfg: DoRAConfig, *, rngs: nnx.Rngs):
    super().__init__(base, tower, cfg, rngs=rngs)
    self.magnitude = partition.SPECIFIC[tower](self._weight_norm())  # B = 0: column norms of the frozen kernel

  def _weight_norm(self) -> jax.Array:
    kernel = self.base.kernel[...].astype(jnp.float32)
    return jax.lax.stop_gradient(jnp.linalg.norm(kernel + jax.lax.stop_gradient(self.delta()), axis=0))

  def effective_kernel(self) -> jax.Array:
    ratio = self.magnitude[...] / self._weight_norm()
    return ratio[None, :] * super().effective_kernel()

  def __call__(self, x: jax.Array, call: Call | None = None) -> jax.Array:
    kernel = self.base.kernel[...]
    ratio = self.magnitude[...] / self._weight_norm()
    clean = x.astype(kernel.dtype) @ kernel
    dropped_x = dropout(x, self.cfg.dropout, call_rngs(call))
    dropped = clean if dropped_x is x else dropped_x.astype(kernel.dtype) @ kernel
    branch = self.scale * ((dropped_x @ self.lora_A[...]) @ self.lora_B[...])
    y = clean + ((ratio - 1) * dropped + ratio * branch).astype(clean.dtype)
    return y if self.base.bias is None else y + self.base.bias[...]
