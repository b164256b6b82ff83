"""A decoder-only LM of the Llama family in Flax NNX, computing what Hugging Face's `LlamaForCausalLM` and
`Qwen2ForCausalLM` compute: RMSNorm, rotary position embeddings (transformers' default, linear, dynamic, yarn,
longrope and llama3 types), SwiGLU MLP, grouped-query attention, tied or untied input/output embeddings, Llama's
optional attention and MLP biases and Qwen2's fixed q/k/v biases. `LlamaConfig.from_hf_dict` reads config.json
as transformers 5 does and refuses, naming the field, what this model does not compute (sliding windows, partial
or per-layer rotary embeddings, other activations).

Names follow Hugging Face (`model/layers/0/self_attn/q_proj/kernel` is `model.layers.0.self_attn.q_proj.weight`
transposed), so `mora_jax.models.hf` maps checkpoints mechanically and adapter targets read as in PEFT. Every
weight carries `logical_axes` metadata for `mora_jax.sharding`. Projections are `modeling.Linear`s called as
`proj(x, call)`, so the adapters that wrap CLIP's projections wrap these too.

Decoding uses a fixed-size KV cache (`KVCache`): a prompt batch is left-padded, prefilled in one pass, then one
token per step; positions count valid tokens only, so padding never shifts the rotary phase.
"""

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mora_jax.models.modeling import Linear, _normal

MODEL_TYPES = ("llama", "qwen2")
# transformers' Qwen2Config defaults where they differ from LlamaConfig's: what a config.json that omits the key means.
QWEN2_DEFAULTS = dict(vocab_size=151936, intermediate_size=22016, num_key_value_heads=32,
                      max_position_embeddings=32768, bos_token_id=None, eos_token_id=None)
# transformers' rotary types (ROPE_INIT_FUNCTIONS) that `inverse_frequencies` implements, each with the
# `rope_parameters` keys transformers' validation requires of it (rope_theta and the original length have defaults).
ROPE_REQUIRED_KEYS = {"default": (), "linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),
                      "longrope": ("short_factor", "long_factor"),
                      "llama3": ("factor", "low_freq_factor", "high_freq_factor")}
# Types whose frequencies depend on the pre-training length; transformers fills it in (see `RopeScaling`).
_ORIGINAL_LENGTH_TYPES = ("yarn", "longrope", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """A scaled rotary embedding: transformers' `rope_parameters` other than rope_theta, names as there (None: a key
  this type does not read). Factors left implicit in config.json are resolved by `LlamaConfig.from_hf_dict`."""
  rope_type: str
  factor: float | None = None
  original_max_position_embeddings: int | None = None
  low_freq_factor: float | None = None  # llama3
  high_freq_factor: float | None = None  # llama3
  attention_factor: float | None = None  # yarn, longrope: None means the paper's value for `factor`
  beta_fast: float | None = None  # yarn
  beta_slow: float | None = None  # yarn
  mscale: float | None = None  # yarn
  mscale_all_dim: float | None = None  # yarn
  truncate: bool | None = None  # yarn
  short_factor: tuple[float, ...] | None = None  # longrope
  long_factor: tuple[float, ...] | None = None  # longrope

  def __post_init__(self):
    if self.rope_type not in ROPE_REQUIRED_KEYS or self.rope_type == "default":
      raise ValueError(f"rope_type={self.rope_type!r} is not implemented; this decoder implements "
                       f"{tuple(ROPE_REQUIRED_KEYS)}.")
    for key in ROPE_REQUIRED_KEYS[self.rope_type] + (("original_max_position_embeddings",)
                                                     if self.rope_type in _ORIGINAL_LENGTH_TYPES else ()):
      if getattr(self, key) is None:
        raise ValueError(f"rope_parameters of rope_type {self.rope_type!r} need {key}.")

  def to_hf_dict(self) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """The architecture; field names and defaults are transformers' `LlamaConfig` (Qwen2: `model_type="qwen2"`)."""
  model_type: str = "llama"
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None  # None: as many as attention heads (no grouping)
  head_dim: int | None = None  # None: hidden_size // num_attention_heads
  max_position_embeddings: int = 2048
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None  # None: rope_type "default"
  tie_word_embeddings: bool = False
  attention_bias: bool = False  # Llama: bias on q, k, v and o; Qwen2 always has q/k/v biases and no o bias
  mlp_bias: bool = False  # Llama only: Qwen2's MLP has no biases
  initializer_range: float = 0.02
  bos_token_id: int | None = 1
  eos_token_id: int | None = 2
  pad_token_id: int | None = None

  def __post_init__(self):
    if self.model_type not in MODEL_TYPES:
      raise ValueError(f"model_type={self.model_type!r}: use one of {MODEL_TYPES}.")
    if self.num_key_value_heads is None:
      object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None:
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads "
                       f"{self.num_key_value_heads}.")
    if self.head_dim % 2:
      raise ValueError(f"head_dim {self.head_dim} must be even (rotary embeddings rotate pairs).")
    if self.model_type == "qwen2" and (self.mlp_bias or self.attention_bias):
      raise ValueError("mlp_bias and attention_bias are Llama settings: Qwen2's biases are fixed (q/k/v only).")
    scaling = self.rope_scaling
    if scaling is not None and scaling.rope_type == "longrope":
      for key in ("short_factor", "long_factor"):
        if len(getattr(scaling, key)) != self.head_dim // 2:
          raise ValueError(f"rope_parameters {key} has {len(getattr(scaling, key))} values; longrope needs one per "
                           f"rotated pair, head_dim // 2 = {self.head_dim // 2}.")

  @property
  def qkv_bias(self) -> bool:
    return self.model_type == "qwen2" or self.attention_bias

  @property
  def o_bias(self) -> bool:
    return self.model_type == "llama" and self.attention_bias

  def to_hf_dict(self) -> dict[str, Any]:
    """The `config.json` content that transformers' LlamaConfig / Qwen2Config reads."""
    values = dataclasses.asdict(self)
    values.pop("rope_theta")
    values.pop("rope_scaling")
    if self.model_type == "qwen2":
      values.pop("attention_bias")
      values.pop("mlp_bias")
    architecture = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[self.model_type]
    rope = {"rope_type": "default"} if self.rope_scaling is None else self.rope_scaling.to_hf_dict()
    return {"architectures": [architecture], "hidden_act": "silu",
            "rope_parameters": {**rope, "rope_theta": self.rope_theta}, **values}

  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any]) -> "LlamaConfig":
    """Reads a transformers Llama or Qwen2 `config.json` dict as transformers 5 reads it. Settings that change the
    computation and that this model does not implement (sliding windows, other activations or rotary types) are
    errors naming the field; settings transformers ignores for the model type are ignored here too."""
    model_type = hf.get("model_type", "llama")
    if model_type not in MODEL_TYPES:
      raise ValueError(f"model_type is {model_type!r}; this decoder implements {MODEL_TYPES}.")
    if hf.get("hidden_act", "silu") != "silu":
      raise ValueError(f"hidden_act={hf['hidden_act']!r}; the Llama-family MLP here is SwiGLU (silu).")
    defaults = QWEN2_DEFAULTS if model_type == "qwen2" else {}
    names = {f.name for f in dataclasses.fields(cls)} - {"model_type", "rope_theta", "rope_scaling"}
    if model_type == "qwen2":  # Qwen2's modules read neither (its biases are fixed)
      names -= {"attention_bias", "mlp_bias"}
      _refuse_sliding_layers(hf, hf.get("num_hidden_layers", cls.num_hidden_layers))
    values = {k: hf[k] if k in hf else defaults[k] for k in names if k in hf or k in defaults}
    if isinstance(values.get("eos_token_id"), list):  # several stop ids: the first one ends our generations
      values["eos_token_id"] = values["eos_token_id"][0]
    config = cls(model_type=model_type, **values)
    theta, scaling = _rope_from_hf_dict(hf, config)
    return dataclasses.replace(config, rope_theta=theta, rope_scaling=scaling)


def _refuse_sliding_layers(hf: dict[str, Any], num_layers: int) -> None:
  """Qwen2Config's layer types: sliding-window attention from layer max_window_layers on, when use_sliding_window
  and a sliding_window are set."""
  layer_types = hf.get("layer_types")
  if layer_types is None:
    sliding = hf.get("use_sliding_window") and hf.get("sliding_window", 4096) is not None
    first_sliding = hf.get("max_window_layers", 28) if sliding else num_layers
    layer_types = ["full_attention"] * min(first_sliding, num_layers) + ["sliding_attention"] * (
        num_layers - first_sliding)
  if set(layer_types) - {"full_attention"}:
    raise ValueError(f"use_sliding_window / layer_types: layers {layer_types} include sliding-window attention, "
                     "which this decoder does not implement (only full_attention).")


def _rope_from_hf_dict(hf: dict[str, Any], config: LlamaConfig) -> tuple[float, RopeScaling | None]:
  """rope_theta and the scaling, resolved as transformers 5's RotaryEmbeddingConfigMixin does: a non-empty
  legacy rope_scaling replaces rope_parameters whole (its rope_theta too), rope_theta falls back to the top-level
  key, then 10000; "type" is the legacy name of "rope_type"; a top-level original_max_position_embeddings wins
  over the dict's, which defaults to max_position_embeddings."""
  rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
  source = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
  if any(isinstance(v, dict) for v in rope.values()):
    raise ValueError(f"{source} {rope} is per layer type; this decoder has one rotary embedding for all layers.")
  theta = float(rope.get("rope_theta", hf.get("rope_theta", LlamaConfig.rope_theta)))
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in ROPE_REQUIRED_KEYS:
    raise ValueError(f"{source} rope_type={rope_type!r} is not implemented; this decoder implements "
                     f"{tuple(ROPE_REQUIRED_KEYS)}.")
  missing = [k for k in ROPE_REQUIRED_KEYS[rope_type] if k not in rope]
  if missing:
    raise ValueError(f"{source} of rope_type {rope_type!r} lacks {', '.join(missing)} (transformers requires it).")
  partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  # Llama's and Qwen2's default rotary embedding ignore partial_rotary_factor; the scaled ones rotate a part
  # that then does not fit the head (transformers fails at the first forward pass).
  if rope_type != "default" and int(config.head_dim * partial) != config.head_dim:
    raise ValueError(f"partial_rotary_factor={partial}: partial rotary embeddings are not implemented.")
  if rope_type == "default":
    return theta, None
  fields = {f.name for f in dataclasses.fields(RopeScaling)} - {"rope_type"}
  values = {k: tuple(v) if isinstance(v, list) else v for k, v in rope.items() if k in fields and v is not None}
  if rope_type in _ORIGINAL_LENGTH_TYPES:
    values["original_max_position_embeddings"] = hf.get(
        "original_max_position_embeddings", rope.get("original_max_position_embeddings",
                                                     config.max_position_embeddings))
    if rope_type in ("yarn", "longrope") and values.get("factor") is None:  # implied by the two lengths
      values["factor"] = config.max_position_embeddings / values["original_max_position_embeddings"]
  if rope_type == "yarn":  # transformers truncates unless the key is there and false (or null)
    values["truncate"] = bool(rope.get("truncate", True))
  return theta, RopeScaling(rope_type, **values)


@dataclasses.dataclass
class TokenCall:
  """What one forward pass threads to every projection, per token of the sequence: the dropout stream (None:
  deterministic), the modality id (0 text, 1 image, ...), which rows may serve as MokA's keys (the question
  tokens), and which rows are padding. Plain projections ignore it; adapted ones (mora_jax.adapters.moka) read it.
  """
  rngs: nnx.Rngs | None = None
  modality: jax.Array | None = None  # int [B, L]
  key_mask: jax.Array | None = None  # bool [B, L]
  padding: jax.Array | None = None  # bool [B, L]


class KVCache(NamedTuple):
  """Keys and values of every layer for `size` slots, filled left to right.

  k, v [layers, B, size, kv_heads, head_dim]; valid bool [B, size], the filled slots that are not padding;
  end: slots filled so far (a scalar, the same for the batch); position int [B], the rotary position of the
  batch's next token (its number of valid tokens so far).
  """
  k: jax.Array
  v: jax.Array
  valid: jax.Array
  end: jax.Array
  position: jax.Array


def init_cache(config: LlamaConfig, batch: int, size: int, dtype=jnp.float32) -> KVCache:
  shape = (config.num_hidden_layers, batch, size, config.num_key_value_heads, config.head_dim)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, size), bool),
                 jnp.zeros((), jnp.int32), jnp.zeros((batch,), jnp.int32))


def positions_from_mask(attention_mask: jax.Array, start: jax.Array | int = 0) -> jax.Array:
  """Rotary positions [B, L]: the count of valid tokens before each token (padding gets its neighbour's)."""
  return start + jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def inverse_frequencies(config: LlamaConfig, length: jax.Array) -> tuple[jax.Array, float]:
  """The rotary inverse frequencies float32 [head_dim // 2] and the cos/sin scale, computed as transformers'
  rope init functions compute them (modeling_rope_utils, same float32 operations) for a pass whose positions
  are below `length` (a scalar: the dynamic and longrope types depend on it)."""
  dim, base, scaling = config.head_dim, config.rope_theta, config.rope_scaling
  exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
  kind = "default" if scaling is None else scaling.rope_type
  if kind == "default":
    return 1.0 / base**exponents, 1.0
  if kind == "linear":
    return 1.0 / base**exponents / scaling.factor, 1.0
  if kind == "dynamic":
    # transformers rescales the base once positions pass max_position_embeddings. (Its module keeps the longest
    # length it has seen across calls; a fresh one, as every pass here, uses the pass's own.)
    factor, trained = scaling.factor, config.max_position_embeddings
    length = jnp.maximum(length, trained).astype(jnp.float32)
    return 1.0 / (base * (factor * length / trained - (factor - 1))**(dim / (dim - 2)))**exponents, 1.0
  original = scaling.original_max_position_embeddings
  if kind == "llama3":
    inv_freq = 1.0 / base**exponents
    low_wavelength, high_wavelength = original / scaling.low_freq_factor, original / scaling.high_freq_factor
    wavelength = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelength > low_wavelength, inv_freq / scaling.factor, inv_freq)
    smooth = (original / wavelength - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelength < high_wavelength) & ~(wavelength > low_wavelength)
    return jnp.where(medium, smoothed, scaled), 1.0
  if kind == "longrope":
    factor = scaling.factor
    attention_factor = scaling.attention_factor
    if attention_factor is None:
      attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    extension = jnp.where(length > original, jnp.asarray(scaling.long_factor, jnp.float32),
                          jnp.asarray(scaling.short_factor, jnp.float32))
    return 1.0 / (extension * base**exponents), attention_factor
  # yarn: interpolated (divided by factor) low frequencies, extrapolated high ones, a linear ramp between.
  factor = scaling.factor
  attention_factor = scaling.attention_factor
  if attention_factor is None:
    if scaling.mscale and scaling.mscale_all_dim:
      attention_factor = _yarn_mscale(factor, scaling.mscale) / _yarn_mscale(factor, scaling.mscale_all_dim)
    else:
      attention_factor = _yarn_mscale(factor)

  def correction_dim(rotations: float) -> float:
    return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low, high = correction_dim(scaling.beta_fast or 32), correction_dim(scaling.beta_slow or 1)
  if scaling.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # as transformers: no division by zero
  ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
  frequencies = base**exponents
  extrapolation = 1 - ramp
  return 1.0 / (factor * frequencies) * (1 - extrapolation) + 1.0 / frequencies * extrapolation, attention_factor


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rotary(positions: jax.Array, config: LlamaConfig) -> tuple[jax.Array, jax.Array]:
  """cos, sin [B, L, head_dim] in float32, Hugging Face's non-interleaved layout (frequencies repeated)."""
  inv_freq, scale = inverse_frequencies(config, positions.max() + 1)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [B, L, heads, head_dim] rotated: x cos + rotate_half(x) sin, rotate_half(x) = (-x2, x1)."""
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


class RMSNorm(nnx.Module):
  """x / sqrt(mean(x^2) + eps) * weight, in float32 (as Hugging Face's LlamaRMSNorm)."""

  def __init__(self, features: int, eps: float):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((features,), jnp.float32), logical_axes=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
    return (self.scale[...] * x32).astype(x.dtype)


class Attention(nnx.Module):
  """Grouped-query causal self-attention with rotary embeddings; Hugging Face's LlamaAttention."""

  def __init__(self, cfg: LlamaConfig, *, dtype, rngs: nnx.Rngs):
    self.cfg = cfg
    d, hd, std = cfg.hidden_size, cfg.head_dim, cfg.initializer_range
    common = dict(std=std, dtype=dtype, rngs=rngs)
    self.q_proj = Linear(d, cfg.num_attention_heads * hd, axes=("embed", "joined_kv"), use_bias=cfg.qkv_bias,
                         **common)
    self.k_proj = Linear(d, cfg.num_key_value_heads * hd, axes=("embed", "joined_kv"), use_bias=cfg.qkv_bias,
                         **common)
    self.v_proj = Linear(d, cfg.num_key_value_heads * hd, axes=("embed", "joined_kv"), use_bias=cfg.qkv_bias,
                         **common)
    self.o_proj = Linear(cfg.num_attention_heads * hd, d, axes=("joined_kv", "embed"), use_bias=cfg.o_bias,
                         **common)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, key_valid: jax.Array, call: TokenCall | None,
               cached: tuple[jax.Array, jax.Array, jax.Array] | None = None):
    """x [B, L, D]; cos/sin of the L tokens; key_valid bool [B, T] (T = L without a cache, the cache size with
    one); cached: (k, v, end) of this layer, the L new keys are written at slots [end, end + L).

    Returns (output [B, L, D], (k, v) [B, T, kv_heads, head_dim] after the write)."""
    cfg = self.cfg
    b, length, _ = x.shape
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    q = self.q_proj(x, call).reshape(b, length, cfg.num_attention_heads, cfg.head_dim)
    k = self.k_proj(x, call).reshape(b, length, cfg.num_key_value_heads, cfg.head_dim)
    v = self.v_proj(x, call).reshape(b, length, cfg.num_key_value_heads, cfg.head_dim)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    start = 0
    if cached is not None:
      cache_k, cache_v, start = cached
      k = jax.lax.dynamic_update_slice_in_dim(cache_k, k.astype(cache_k.dtype), start, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(cache_v, v.astype(cache_v.dtype), start, axis=1)
    slots = jnp.arange(k.shape[1])
    causal = slots[None, :] <= start + jnp.arange(length)[:, None]  # [L, T]
    mask = causal[None, :, :] & key_valid[:, None, :]  # [B, L, T]
    q = q.reshape(b, length, cfg.num_key_value_heads, groups, cfg.head_dim)
    logits = jnp.einsum("blkgh,btkh->bkglt", q, k.astype(q.dtype)).astype(jnp.float32) * cfg.head_dim**-0.5
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkglt,btkh->blkgh", weights, v).reshape(b, length, -1)
    return self.o_proj(out, call), (k, v)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: LlamaConfig, *, dtype, rngs: nnx.Rngs):
    common = dict(std=cfg.initializer_range, use_bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)
    self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **common)
    self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **common)
    self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), **common)

  def __call__(self, x: jax.Array, call: TokenCall | None) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x, call)) * self.up_proj(x, call), call)


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, dtype, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

  def __call__(self, x, cos, sin, key_valid, call, cached=None):
    attended, kv = self.self_attn(self.input_layernorm(x), cos, sin, key_valid, call, cached)
    x = x + attended
    return x + self.mlp(self.post_attention_layernorm(x), call), kv


class Embedding(nnx.Module):

  def __init__(self, num: int, features: int, *, std: float, dtype, rngs: nnx.Rngs):
    self.embedding = nnx.Param(_normal(rngs, (num, features), std, dtype), logical_axes=("vocab", "embed"))

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0)


class LlamaModel(nnx.Module):
  """The decoder stack without the LM head (Hugging Face's `LlamaModel`, the `model.` prefix)."""

  def __init__(self, cfg: LlamaConfig, *, dtype, rngs: nnx.Rngs):
    self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, std=cfg.initializer_range, dtype=dtype,
                                  rngs=rngs)
    self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nnx.Module):
  """Hugging Face's `LlamaForCausalLM` / `Qwen2ForCausalLM` (same parameters and computation)."""

  def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.model = LlamaModel(config, dtype=dtype, rngs=rngs)
    self.lm_head = None if config.tie_word_embeddings else Linear(
        config.hidden_size, config.vocab_size, axes=("embed", "vocab"), std=config.initializer_range,
        use_bias=False, dtype=dtype, rngs=rngs)

  def embed(self, input_ids: jax.Array) -> jax.Array:
    return self.model.embed_tokens(input_ids)

  def hidden_states(self, inputs_embeds: jax.Array, attention_mask: jax.Array | None = None,
                    call: TokenCall | None = None, cache: KVCache | None = None
                    ) -> tuple[jax.Array, KVCache | None]:
    """The final-norm hidden states [B, L, D] of `inputs_embeds` [B, L, D], and the cache after them.

    attention_mask {0,1} [B, L] marks valid tokens (left padding for batched prompts); with a cache, the L
    tokens continue the cached sequence."""
    b, length, _ = inputs_embeds.shape
    valid = jnp.ones((b, length), bool) if attention_mask is None else attention_mask.astype(bool)
    cfg = self.config
    if cache is None:
      positions, key_valid = positions_from_mask(valid), valid
    else:
      positions = positions_from_mask(valid, cache.position[:, None])
      key_valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, valid, cache.end, axis=1)
    cos, sin = rotary(positions, cfg)
    x, ks, vs = inputs_embeds, [], []
    for index, layer in enumerate(self.model.layers):
      cached = None if cache is None else (cache.k[index], cache.v[index], cache.end)
      x, (k, v) = layer(x, cos, sin, key_valid, call, cached)
      ks.append(k)
      vs.append(v)
    x = self.model.norm(x)
    if cache is None:
      return x, None
    return x, KVCache(jnp.stack(ks), jnp.stack(vs), key_valid, cache.end + length,
                      cache.position + valid.sum(-1).astype(jnp.int32))

  def logits(self, hidden: jax.Array) -> jax.Array:
    """float32 [.., vocab] from final hidden states."""
    if self.lm_head is None:
      embedding = self.model.embed_tokens.embedding[...]
      return (hidden.astype(embedding.dtype) @ embedding.T).astype(jnp.float32)
    return self.lm_head(hidden).astype(jnp.float32)

  def __call__(self, input_ids: jax.Array | None = None, attention_mask: jax.Array | None = None, *,
               inputs_embeds: jax.Array | None = None, call: TokenCall | None = None,
               cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
    """(logits float32 [B, L, vocab], the cache after these tokens or None): from token ids or embeddings."""
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids and inputs_embeds.")
    if inputs_embeds is None:
      inputs_embeds = self.embed(input_ids)
    hidden, cache = self.hidden_states(inputs_embeds, attention_mask, call, cache)
    return self.logits(hidden), cache


def init(config: LlamaConfig, seed: int = 0, dtype=jnp.float32) -> LlamaForCausalLM:
  """A randomly initialised LM (Hugging Face's initialisation: normal(initializer_range), norms at one)."""
  return LlamaForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(seed))


# ------------------------------------------------------------------------------------------------ decoding


def next_token(logits: jax.Array, temperature: float, key: jax.Array | None) -> jax.Array:
  """Greedy (temperature 0) or a sample from softmax(logits / temperature); logits [B, vocab] -> int [B]."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


def decode(model: LlamaForCausalLM, first_logits: jax.Array, cache: KVCache, max_new_tokens: int, *,
           temperature: float = 0.0, key: jax.Array | None = None, eos_token_id: int | None = None,
           pad_token_id: int = 0, call_for_token=None) -> jax.Array:
  """Continues a prefilled cache (with >= max_new_tokens - 1 free slots): int [B, max_new_tokens], each sample
  padded with `pad_token_id` after its first `eos_token_id` (as transformers' generate).

  first_logits [B, vocab]: the prefill's logits at the last prompt token. call_for_token(ids [B, 1]) gives the
  TokenCall of one new token (None: plain projections).
  """
  if temperature and key is None:
    raise ValueError("sampling (temperature > 0) needs a PRNG key.")
  keys = jax.random.split(key if key is not None else jax.random.key(0), max_new_tokens)
  graphdef, state = nnx.split(model)

  def step(carry, step_key):
    token, done, cache = carry
    emitted = jnp.where(done, pad_token_id, token)
    if eos_token_id is not None:
      done = done | (token == eos_token_id)
    ids = token[:, None]
    call = None if call_for_token is None else call_for_token(ids)
    logits, cache = nnx.merge(graphdef, state)(ids, jnp.ones_like(ids), call=call, cache=cache)
    return (next_token(logits[:, -1], temperature, step_key), done, cache), emitted

  first = next_token(first_logits, temperature, keys[0])
  # n - 1 steps emit tokens 0 .. n-2 and leave token n-1 in the carry.
  (last, done, _), tokens = jax.lax.scan(step, (first, jnp.zeros(first.shape, bool), cache), keys[1:])
  return jnp.concatenate([tokens.T, jnp.where(done, pad_token_id, last)[:, None]], axis=1)


def generate(model: LlamaForCausalLM, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
             max_new_tokens: int, temperature: float = 0.0, key: jax.Array | None = None,
             eos_token_id: int | None = None, pad_token_id: int = 0) -> jax.Array:
  """Text-only generation from left-padded prompts input_ids [B, L]: the new tokens, int [B, max_new_tokens]."""
  b, length = input_ids.shape
  cache = init_cache(model.config, b, length + max_new_tokens, model.model.embed_tokens.embedding.dtype)
  logits, cache = model(input_ids, attention_mask, cache=cache)
  return decode(model, logits[:, -1], cache, max_new_tokens, temperature=temperature, key=key,
                eos_token_id=eos_token_id, pad_token_id=pad_token_id)
