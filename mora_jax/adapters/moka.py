"""MokA (arXiv 2506.05191): LoRA for token sequences that mix modalities, exactly as docs/method.md.

Per-modality down-projections A_m, a parameter-free cross-attention in rank space (non-text rows are queries,
text rows are keys and values), and one up-projection B shared by all tokens. With our kernel layout
K = W0^T [in, out], A [M, in, r] and B [r, out], an adapted linear computes, for row i of modality m(i):

    z_i   = dropout(x_i) A_{m(i)}
    att_i = sum_j softmax_j(z_i . z_j / tau) z_j     over key rows j: valid (key_mask), non-padding text rows
    z_i  += lambda_{m(i)} * att_i                     non-text, non-padding rows only; text rows never change
    y_i   = x_i K + b + scale * z_i B                 scale = alpha / r; padding rows get no update

A row whose sample has no valid key gets a zero cross term (a "safe" softmax), so MokA degenerates to
per-modality A + shared B, and with one modality to plain LoRA. Options (`MokAConfig`): tau = sqrt(r) or
sqrt(number of keys of the sample); `scale` after B (the authors' default) or on z before the attention; on a
decoder LM, whether every layer reads the tokens' modalities and keys or only layer 0, as the authors' visual-text
code runs (`decoder_masks`, docs/mllm.md).

No `merge`: the per-modality part K + scale * A_m B (`MokALinear.delta`) folds into the kernel for inference,
but the cross term depends on the input, so the full layer cannot be folded.
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from mora_jax.adapters import lm, partition
from mora_jax.adapters.common import DECODER, AdapterConfig, Target, call_rngs, dropout, kaiming_uniform_a
from mora_jax.models.llama import TokenCall
from mora_jax.models.modeling import Call, Linear

TEMPERATURES = ("sqrt_rank", "sqrt_num_keys")
SCALE_PLACEMENTS = ("after_b", "before_attention")
DECODER_MASKS = ("every_layer", "first_layer")


@dataclasses.dataclass(frozen=True)
class MokAConfig(AdapterConfig):
  """MokA hyper-parameters (the MokA authors' defaults); `lambdas`, when given, is lambda per modality id and
  overrides `lam`. On a CLIP model it is MokA (two-tower): see `TowerLinear`; on a decoder LM, MokA in its
  native setting: see `DecoderMokA`."""
  name: ClassVar[str] = "moka"
  mergeable: ClassVar[bool] = False  # the cross term depends on the input (the text rows)
  text_first: ClassVar[bool] = True  # the vision projections attend over the text projections' rows
  separable: ClassVar[bool] = False  # so the vision features depend on the text
  adapts_decoder: ClassVar[bool] = True
  dropout: float = 0.05  # the MokA authors' (LoRA, DoRA and MoRA use 0.1)
  alpha: float = 16.0  # scale = alpha / rank
  lam: float = 0.05  # lambda of every non-text modality (the authors' visual-text value; 1.0 audio-visual)
  lambdas: tuple[float, ...] = ()
  temperature: str = "sqrt_rank"  # tau = sqrt(rank), or "sqrt_num_keys": sqrt(valid keys of the sample)
  scale_placement: str = "after_b"  # or "before_attention": z *= scale before the attention, B z unscaled
  # Which decoder layers read the tokens' modality ids and keys: "first_layer": decoder layer 0 only, the others
  # LoRA with the text A for every token, as the authors' visual-text code computes whenever a KV cache exists, in
  # its training as in its generation, behind its published numbers (docs/mllm.md); with start_layer > 0 no adapted
  # layer reads them then. Or "every_layer", as their audio-visual-text code.
  decoder_masks: str = "first_layer"

  def __post_init__(self):
    super().__post_init__()
    object.__setattr__(self, "lambdas", tuple(float(v) for v in self.lambdas))
    if self.temperature not in TEMPERATURES:
      raise ValueError(f"MokAConfig.temperature={self.temperature!r}: use one of {TEMPERATURES}.")
    if self.scale_placement not in SCALE_PLACEMENTS:
      raise ValueError(f"MokAConfig.scale_placement={self.scale_placement!r}: use one of {SCALE_PLACEMENTS}.")
    if self.decoder_masks not in DECODER_MASKS:
      raise ValueError(f"MokAConfig.decoder_masks={self.decoder_masks!r}: use one of {DECODER_MASKS}.")

  @property
  def scale(self) -> float:
    """alpha / rank, applied after B or on z before the attention (`scale_placement`)."""
    return self.alpha / self.rank

  def modality_lambdas(self, num_modalities: int) -> tuple[float, ...]:
    """lambda per modality id (the text modality's entry is never read: text rows are not queries)."""
    if not self.lambdas:
      return (self.lam,) * num_modalities
    if len(self.lambdas) != num_modalities:
      raise ValueError(f"MokAConfig.lambdas has {len(self.lambdas)} entries for {num_modalities} modalities.")
    return self.lambdas

  def adapt(self, base: Linear, target: Target, shared: nnx.Dict, model, *, rngs: nnx.Rngs) -> nnx.Module:
    if target.tower == DECODER:
      reads_modalities = self.decoder_masks == "every_layer" or target.layer == 0
      return DecoderMokA(base, lm.NUM_MODALITIES, self, reads_modalities=reads_modalities, rngs=rngs)
    if set(self.towers) != {"vision", "text"}:
      raise ValueError(f"MokA (two-tower) pairs the vision and text projections; towers={self.towers} lacks one.")
    return TowerLinear(base, target, self, rngs=rngs)


def temperature(name: str, rank: int, key_mask: jax.Array) -> jax.Array:
  """tau per sample, [B]: "sqrt_rank" sqrt(rank), or "sqrt_num_keys" sqrt of the sample's number of valid keys
  (floored at 1)."""
  if name == "sqrt_rank":
    return jnp.full(key_mask.shape[:1], rank**0.5, jnp.float32)
  if name == "sqrt_num_keys":
    return jnp.sqrt(jnp.maximum(key_mask.sum(-1), 1).astype(jnp.float32))
  raise ValueError(f"temperature={name!r}: use one of {TEMPERATURES}.")


def cross_attention(queries: jax.Array, keys: jax.Array, key_mask: jax.Array, temperature: jax.Array | float
                   ) -> jax.Array:
  """softmax(q k^T / tau) k over the valid keys (keys are the values), [B, Lq, r], softmax in float32.

  queries [B, Lq, r]; keys [B, Lk, r]; key_mask bool [B, Lk]; temperature a scalar or [B]. A sample with no
  valid key gets exactly 0, with finite (zero) gradients.
  """
  q, k = queries.astype(jnp.float32), keys.astype(jnp.float32)
  tau = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), q.shape[:1])
  mask = key_mask[:, None, :]
  logits = jnp.einsum("bqr,bkr->bqk", q, k) / tau[:, None, None]
  # The max shift is stop-gradient, which softmax's shift invariance allows; it is 0 for a row with no key.
  peak = jax.lax.stop_gradient(jnp.max(jnp.where(mask, logits, -jnp.inf), axis=-1, keepdims=True))
  peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
  # Masked entries go to exp as 0, so that no exp overflows: an inf there, even masked out afterwards, would
  # send 0 * inf = NaN back in the backward pass.
  weights = jnp.where(mask, jnp.exp(jnp.where(mask, logits - peak, 0.0)), 0.0)
  total = weights.sum(-1, keepdims=True)  # >= 1 when a key is valid (the peak's term is exp(0))
  weights = weights / jnp.where(total > 0, total, 1.0)
  return jnp.einsum("bqk,bkr->bqr", weights, k).astype(queries.dtype)


def key_rows(modality: jax.Array, key_mask: jax.Array, padding: jax.Array, text_modality: int = 0) -> jax.Array:
  """Rows that serve as keys and values, bool [B, L]: text, allowed by `key_mask`, not padding."""
  return (modality == text_modality) & key_mask & ~padding


def row_lambdas(lambdas: jax.Array, modality: jax.Array) -> jax.Array:
  """lambda_{m(i)} per row, [B, L, 1], from lambdas [M] by modality id."""
  # Out-of-range ids only appear on padding rows, which are no queries, so clipping them is harmless.
  return jnp.take(jnp.asarray(lambdas, jnp.float32), modality, mode="clip")[..., None]


def rank_space_update(z: jax.Array, modality: jax.Array, key_mask: jax.Array, padding: jax.Array,
                      lambdas: jax.Array, tau: jax.Array | float, text_modality: int = 0) -> jax.Array:
  """MokA's cross term for any layout: non-text, non-padding rows get z_i + lambda_{m(i)} att_i, others keep z.

  z [B, L, r]; modality int [B, L]; key_mask bool [B, L] (which text rows may be keys); padding bool [B, L];
  lambdas [M] by modality id; tau a scalar or [B]. Logits are [B, L, L].
  """
  queries = (modality != text_modality) & ~padding
  att = cross_attention(z, z, key_rows(modality, key_mask, padding, text_modality), tau)
  return jnp.where(queries[..., None], z + (row_lambdas(lambdas, modality) * att).astype(z.dtype), z)


def fixed_layout_update(z_queries: jax.Array, z_keys: jax.Array, key_mask: jax.Array, lam: jax.Array | float,
                        tau: jax.Array | float) -> jax.Array:
  """The updated query rows z_q + lam * att for a layout known to be [query rows; key rows].

  z_queries [B, Lq, r] (the non-text rows); z_keys [B, Lk, r] (the text rows, unchanged by definition);
  key_mask bool [B, Lk]; lam a scalar or broadcastable to [B, Lq, 1]; tau a scalar or [B]. Logits are
  [B, Lq, Lk] only.
  """
  att = cross_attention(z_queries, z_keys, key_mask, tau)
  return z_queries + (jnp.asarray(lam, jnp.float32) * att).astype(z_queries.dtype)


class MokALinear(nnx.Module):
  """The frozen Linear it wraps (`base`) plus MokA's branch, for a sequence with a modality id per row.

  Trainable variables are of `variable_type` (a `partition.Trainable` subclass, i.e. the partition they
  belong to). No `merge`: see `delta`.
  """

  def __init__(self, base: Linear, num_modalities: int, cfg: MokAConfig, *,
               variable_type: type[partition.Trainable], rngs: nnx.Rngs):
    if not (isinstance(variable_type, type) and issubclass(variable_type, partition.Trainable)
            and variable_type is not partition.Trainable):
      raise ValueError(f"variable_type={variable_type!r}: use a subclass of partition.Trainable, "
                       "e.g. partition.TextSpecific.")
    if num_modalities < 1:
      raise ValueError(f"num_modalities={num_modalities} must be >= 1.")
    self.base, self.cfg, self.num_modalities = base, cfg, num_modalities
    self.lambdas = cfg.modality_lambdas(num_modalities)
    d_in, d_out = base.kernel.shape
    keys = jax.random.split(rngs.params(), num_modalities)
    self.lora_A = variable_type(jax.vmap(lambda key: kaiming_uniform_a(key, d_in, cfg.rank))(keys))
    self.lora_B = variable_type(jnp.zeros((cfg.rank, d_out), jnp.float32))

  def delta(self, modality_id: int) -> jax.Array:
    """scale * A_m B [in, out]: modality m's foldable update of the kernel.

    K + delta(m) is what rows of modality m see without the cross term (text rows always, every row when
    lambda = 0 or its sample has no key), so it can be folded into the kernel for inference; the cross term
    depends on the input and cannot, hence no `merge` for the full MokA layer.
    """
    return self.cfg.scale * (self.lora_A[modality_id] @ self.lora_B[...])

  def project(self, x: jax.Array, modality: jax.Array) -> jax.Array:
    """z_i = x_i A_{m(i)}, [B, L, r]: one matmul against all M A's side by side, then a one-hot selection.

    With r small, M r extra columns cost less than gathering an [in, r] matrix per row; an id outside
    [0, M) (e.g. -1 on padding) selects nothing and gives z = 0.
    """
    every = jnp.einsum("bli,mir->blmr", x, self.lora_A[...])
    return jnp.einsum("blmr,blm->blr", every, jax.nn.one_hot(modality, self.num_modalities, dtype=every.dtype))

  def __call__(self, x: jax.Array, modality: jax.Array, key_mask: jax.Array, padding: jax.Array | None = None,
               *, layout: int | None = None, text_modality: int = 0, rngs: nnx.Rngs | None = None) -> jax.Array:
    """x [B, L, in] -> [B, L, out].

    modality int [B, L]; key_mask bool [B, L] (text rows allowed as keys); padding bool [B, L] (None: none).
    layout: None for any arrangement of rows ([B, L, L] logits), or a Python int n when rows [:n] are non-text
    and rows [n:] text ([B, n, L - n] logits; `modality` is then read on rows [:n] only).
    """
    y = self.base(x)
    if padding is None:
      padding = jnp.zeros(modality.shape, bool)
    if layout is not None:
      modality = jnp.concatenate([modality[:, :layout], jnp.full_like(modality[:, layout:], text_modality)], 1)
    z = self.project(dropout(x, self.cfg.dropout, rngs), modality)
    after_b = self.cfg.scale_placement == "after_b"
    if not after_b:
      z = self.cfg.scale * z
    keys = key_rows(modality, key_mask, padding, text_modality)
    tau = temperature(self.cfg.temperature, self.cfg.rank, keys)
    if layout is None:
      z = rank_space_update(z, modality, key_mask, padding, self.lambdas, tau, text_modality)
    else:
      lam = row_lambdas(self.lambdas, modality[:, :layout])
      queries = fixed_layout_update(z[:, :layout], z[:, layout:], keys[:, layout:], lam, tau)
      z = jnp.concatenate([queries, z[:, layout:]], 1)
    branch = z @ self.lora_B[...]
    if after_b:
      branch = self.cfg.scale * branch
    return y + jnp.where(padding[..., None], 0.0, branch).astype(y.dtype)


class DecoderMokA(nnx.Module):
  """A frozen decoder projection with a MokA layer, called as the decoder calls projections: proj(x, call), the
  call a `TokenCall` (mora_jax.adapters.lm's modality ids). With one modality every row takes the one A (LoRA);
  a call without modality ids (text-only decoding) is text rows that are no keys. A projection that does not
  read the call's modalities and keys (`reads_modalities=False`: `MokAConfig.decoder_masks="first_layer"` past
  layer 0) takes every row as a text row that is no key: LoRA with the text A, the other A's unused."""

  def __init__(self, base: Linear, num_modalities: int, cfg: MokAConfig, *, reads_modalities: bool = True,
               rngs: nnx.Rngs):
    self.moka = MokALinear(base, num_modalities, cfg, variable_type=partition.Decoder, rngs=rngs)
    self.reads_modalities = reads_modalities

  def __call__(self, x: jax.Array, call: TokenCall | None = None) -> jax.Array:
    call = call if call is not None and call.modality is not None else lm.text_call(x[..., 0])
    modality, key_mask = call.modality, call.key_mask
    if not self.reads_modalities:
      # The authors' layers past layer 0 get no masks and add scale * B A_text dropout(x) to every row; padding
      # rows, which theirs update too, keep no update here: no valid row reads them.
      modality, key_mask = jnp.full_like(modality, lm.TEXT), jnp.zeros(modality.shape, bool)
    if self.moka.num_modalities == 1:
      modality = jnp.zeros_like(modality)
    return self.moka(x, modality, key_mask, call.padding, text_modality=lm.TEXT, rngs=call.rngs)


class TowerLinear(nnx.Module):
  """One tower's projection under MokA (two-tower): the tower's own A [in, r] and B [r, out] (per-tower LoRA;
  768 vs 512 widths forbid one shared B), and for the vision tower the rank-space cross-attention of its rows
  over the paired text projection's rows. Text rows never change, so the text tower runs first and leaves its
  rows in the pass's `Call.handover` under the pair's key (layer and name), where the vision projection reads
  them: the same numbers as running vision layer l and text layer l in lockstep."""

  def __init__(self, base: Linear, target: Target, cfg: MokAConfig, *, rngs: nnx.Rngs):
    self.base, self.tower, self.cfg = base, target.tower, cfg
    self.handover_key = f"moka/{target.layer}/{target.name}"
    d_in, d_out = base.kernel.shape
    specific = partition.SPECIFIC[target.tower]
    self.lora_A = specific(kaiming_uniform_a(rngs.params(), d_in, cfg.rank))
    self.lora_B = specific(jnp.zeros((cfg.rank, d_out), jnp.float32))
    self.lam = cfg.modality_lambdas(2)[1]  # modality ids: 0 text, 1 vision

  def __call__(self, x: jax.Array, call: Call | None = None) -> jax.Array:
    if call is None or call.text_mask is None or (self.tower == "vision"
                                                   and self.handover_key not in call.handover):
      raise RuntimeError("a MokA (two-tower) projection ran outside a classifier pass: run the classifier "
                         "(Classifier.features / __call__), which runs the text tower first and hands its rows "
                         "to the vision tower, not one tower alone.")
    y = self.base(x)
    z = dropout(x, self.cfg.dropout, call_rngs(call)) @ self.lora_A[...]
    after_b = self.cfg.scale_placement == "after_b"
    if not after_b:
      z = self.cfg.scale * z
    if self.tower == "text":
      call.handover[self.handover_key] = z
    else:
      key_mask = text_keys(call.text_mask)
      tau = temperature(self.cfg.temperature, self.cfg.rank, key_mask)
      z = fixed_layout_update(z, call.handover[self.handover_key], key_mask, self.lam, tau)
    branch = z @ self.lora_B[...]
    if after_b:
      branch = self.cfg.scale * branch
    return y + branch.astype(y.dtype)


def text_keys(text_mask: jax.Array) -> jax.Array:
  """Which text rows are keys, bool [B, L]: the valid tokens (`text_mask`, the attention mask) of samples that
  have a text. A missing text is the empty string (docs/protocol.md's dummy), i.e. start and end tokens only, and
  gives no key at all."""
  valid = text_mask.astype(bool)
  has_text = valid.sum(-1, keepdims=True) > 2
  return valid & has_text
