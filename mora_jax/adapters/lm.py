"""Adapters on a decoder LM's projections (mora_jax.models.llama): MokA in its native setting, and LoRA.

Every adapted projection is one `moka.MokALinear` (the MokA layer for any token sequence with modality ids),
reading the pass's `llama.TokenCall` (modality id, question-key mask and padding per token):
- "moka": one A per modality, image rows attend over the question rows in rank space (lambda, tau = sqrt(r)),
  one shared B. lambda 0 leaves per-modality A + shared B.
- "lora": the same layer with a single A that every token uses (MokA with one modality is plain LoRA).

Decoding follows the MokA authors: the prompt (image and question tokens) is prefilled with the full MokA path;
each newly generated token is a text row with no key (`text_call`), i.e. delta = scale * B A_text x, while the
cached keys and values of the prompt keep their MokA computation.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mora_jax.adapters import partition
from mora_jax.adapters.moka import MokAConfig, MokALinear
from mora_jax.models import llama
from mora_jax.models.llama import LlamaForCausalLM, TokenCall
from mora_jax.models.modeling import Linear

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
TARGETS = ATTENTION_TARGETS + MLP_TARGETS
METHODS = ("moka", "lora")
TEXT, IMAGE = 0, 1  # modality ids
NUM_MODALITIES = 2


class LMAdapter(partition.Trainable):
  """Adapter parameters of a decoder LM's projections (every modality's A and the shared B)."""


@dataclasses.dataclass(frozen=True)
class LMAdapterConfig:
  """Which projections of which layers are adapted, and how. Defaults: the MokA authors' (r 4, alpha 16, dropout
  0.05, lambda 0.05, tau sqrt(r), scale after B) on every projection of every layer."""
  method: str = "moka"
  targets: tuple[str, ...] = TARGETS
  start_layer: int = 0
  rank: int = 4
  alpha: float = 16.0
  dropout: float = 0.05
  lam: float = 0.05
  temperature: str = "sqrt_rank"
  scale_placement: str = "after_b"

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    if self.method not in METHODS:
      raise ValueError(f"LM adapter method={self.method!r}: use one of {METHODS}.")
    unknown = [t for t in self.targets if t not in TARGETS]
    if unknown or not self.targets:
      raise ValueError(f"LM adapter targets {self.targets}: each must be one of {TARGETS}.")
    self.layer_config()  # validates rank, dropout, temperature and scale placement

  def layer_config(self) -> MokAConfig:
    """The per-projection hyper-parameters as the MokA layer reads them."""
    return MokAConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout, lam=self.lam,
                      temperature=self.temperature, scale_placement=self.scale_placement)

  @property
  def num_modalities(self) -> int:
    return NUM_MODALITIES if self.method == "moka" else 1


class DecoderMokA(nnx.Module):
  """A frozen decoder projection with a MokA layer, called as the decoder calls projections: proj(x, call)."""

  def __init__(self, base: Linear, cfg: LMAdapterConfig, *, rngs: nnx.Rngs):
    self.moka = MokALinear(base, cfg.num_modalities, cfg.layer_config(), variable_type=LMAdapter, rngs=rngs)

  def __call__(self, x: jax.Array, call: TokenCall | None = None) -> jax.Array:
    call = call if call is not None and call.modality is not None else text_call(x[..., 0])
    modality = call.modality if self.moka.num_modalities > 1 else jnp.zeros_like(call.modality)
    return self.moka(x, modality, call.key_mask, call.padding, text_modality=TEXT, rngs=call.rngs)


def adapt(lm: LlamaForCausalLM, cfg: LMAdapterConfig, *, rngs: nnx.Rngs) -> LlamaForCausalLM:
  """Wraps the targeted projections of layers >= start_layer in place; returns `lm`."""
  layers = lm.model.layers
  if cfg.start_layer >= len(layers):
    raise ValueError(f"LM adapter start_layer={cfg.start_layer} but the LM has only {len(layers)} layers.")
  for layer in list(layers)[cfg.start_layer:]:
    for name in cfg.targets:
      parent = layer.self_attn if name in ATTENTION_TARGETS else layer.mlp
      setattr(parent, name, DecoderMokA(getattr(parent, name), cfg, rngs=rngs))
  return lm


def text_call(ids: jax.Array, rngs: nnx.Rngs | None = None) -> TokenCall:
  """The call of text tokens that are no keys (generated tokens): ids [B, L], any dtype (only the shape is read)."""
  return TokenCall(rngs=rngs, modality=jnp.full(ids.shape, TEXT, jnp.int32), key_mask=jnp.zeros(ids.shape, bool),
                   padding=jnp.zeros(ids.shape, bool))


def generate(lm: LlamaForCausalLM, inputs_embeds: jax.Array, attention_mask: jax.Array, call: TokenCall, *,
             max_new_tokens: int, temperature: float = 0.0, key: jax.Array | None = None,
             eos_token_id: int | None = None, pad_token_id: int = 0) -> jax.Array:
  """Prefills left-padded prompt embeddings [B, L, D] with `call` (the full MokA path), then decodes new text
  tokens: int [B, max_new_tokens]."""
  b, length, _ = inputs_embeds.shape
  cache = llama.init_cache(lm.config, b, length + max_new_tokens, inputs_embeds.dtype)
  logits, cache = lm(attention_mask=attention_mask, inputs_embeds=inputs_embeds, call=call, cache=cache)
  return llama.decode(lm, logits[:, -1], cache, max_new_tokens, temperature=temperature, key=key,
                      eos_token_id=eos_token_id, pad_token_id=pad_token_id, call_for_token=text_call)
