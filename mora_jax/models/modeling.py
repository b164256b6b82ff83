"""CLIP in Flax NNX, computing what Hugging Face's PyTorch `CLIPModel` computes.

Module and parameter names follow Hugging Face (`text_model/encoder/layers/0/self_attn/q_proj/kernel` is
`text_model.encoder.layers.0.self_attn.q_proj.weight` transposed), so checkpoint mapping is mechanical and
adapter targets read as in PEFT. Every weight carries `logical_axes` metadata for `mora_jax.sharding`.

Precision: weights are stored in `dtype` (bf16 halves the frozen backbone); matmuls run in the weight
dtype, while LayerNorm and the attention softmax always run in float32.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mora_jax.models.config import CLIPConfig, TextConfig, VisionConfig

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass
class Call:
  """What one forward pass threads through the towers to every projection: the dropout stream (None:
  deterministic), the text batch's attention mask, and `handover`, where an adapted projection leaves values
  for another one later in the same pass (MokA two-tower: a text projection's rank-space rows for the paired
  vision projection). Made for one pass and dropped after it; modules never keep it."""
  rngs: nnx.Rngs | None = None
  text_mask: jax.Array | None = None
  handover: dict = dataclasses.field(default_factory=dict)


def _normal(rngs: nnx.Rngs, shape, std: float, dtype) -> jax.Array:
  return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
  """y = x @ kernel + bias, kernel [in, out] (Hugging Face's `weight` transposed)."""

  def __init__(self, in_features: int, out_features: int, *, axes: tuple[str, str], std: float,
               use_bias: bool = True, dtype=jnp.float32, rngs: nnx.Rngs):
    self.kernel = nnx.Param(_normal(rngs, (in_features, out_features), std, dtype), logical_axes=axes)
    self.bias = nnx.Param(jnp.zeros((out_features,), dtype), logical_axes=axes[1:]) if use_bias else None

  def __call__(self, x: jax.Array, call: Call | None = None) -> jax.Array:
    del call  # frozen: nothing per call; adapted replacements (mora_jax.adapters) read it
    kernel = self.kernel[...]
    y = x.astype(kernel.dtype) @ kernel
    return y if self.bias is None else y + self.bias[...]


class LayerNorm(nnx.Module):
  """PyTorch LayerNorm (biased variance, eps inside the sqrt), always computed in float32."""

  def __init__(self, features: int, eps: float):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((features,), jnp.float32), logical_axes=("norm",))
    self.bias = nnx.Param(jnp.zeros((features,), jnp.float32), logical_axes=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
    return y.astype(x.dtype)


class Attention(nnx.Module):

  def __init__(self, hidden: int, heads: int, layers: int, *, dtype, rngs: nnx.Rngs):
    self.num_heads = heads
    # Hugging Face CLIP initialisation (CLIPPreTrainedModel._init_weights).
    in_std = hidden**-0.5 * (2 * layers)**-0.5
    qkv = dict(axes=("embed", "joined_kv"), std=in_std, dtype=dtype, rngs=rngs)
    self.q_proj = Linear(hidden, hidden, **qkv)
    self.k_proj = Linear(hidden, hidden, **qkv)
    self.v_proj = Linear(hidden, hidden, **qkv)
    self.out_proj = Linear(hidden, hidden, axes=("joined_kv", "embed"), std=hidden**-0.5, dtype=dtype,
                           rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None, call: Call | None = None) -> jax.Array:
    """x [B, L, D]; mask bool, broadcastable to [B, heads, L, L], True where a query may attend a key."""
    b, length, d = x.shape
    head_dim = d // self.num_heads
    # Heads as a leading batch dimension ([B, H, L, Dh]): XLA's CPU backend runs these batched matmuls faster
    # than the equivalent einsums over a [B, L, H, Dh] layout (ViT-B/16 shapes).
    heads = lambda t: t.reshape(b, length, self.num_heads, head_dim).transpose(0, 2, 1, 3)
    q, k, v = (heads(proj(x, call)) for proj in (self.q_proj, self.k_proj, self.v_proj))
    logits = (q @ k.swapaxes(-1, -2)).astype(jnp.float32) * head_dim**-0.5
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = (weights @ v).transpose(0, 2, 1, 3).reshape(b, length, d)
    return self.out_proj(out, call)


class MLP(nnx.Module):

  def __init__(self, hidden: int, intermediate: int, layers: int, act: str, *, dtype, rngs: nnx.Rngs):
    self.act = _ACTIVATIONS[act]
    self.fc1 = Linear(hidden, intermediate, axes=("embed", "mlp"), std=(2 * hidden)**-0.5, dtype=dtype,
                      rngs=rngs)
    self.fc2 = Linear(intermediate, hidden, axes=("mlp", "embed"),
                      std=hidden**-0.5 * (2 * layers)**-0.5, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, call: Call | None = None) -> jax.Array:
    return self.fc2(self.act(self.fc1(x, call)), call)


class EncoderLayer(nnx.Module):
  """Pre-LN transformer block."""

  def __init__(self, cfg: TextConfig | VisionConfig, *, dtype, rngs: nnx.Rngs):
    d, n = cfg.hidden_size, cfg.num_hidden_layers
    self.layer_norm1 = LayerNorm(d, cfg.layer_norm_eps)
    self.self_attn = Attention(d, cfg.num_attention_heads, n, dtype=dtype, rngs=rngs)
    self.layer_norm2 = LayerNorm(d, cfg.layer_norm_eps)
    self.mlp = MLP(d, cfg.intermediate_size, n, cfg.hidden_act, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None, call: Call | None = None) -> jax.Array:
    x = x + self.self_attn(self.layer_norm1(x), mask, call)
    return x + self.mlp(self.layer_norm2(x), call)


# Prompt tokens of a tower, given its encoder input [B, L, D]: one [B, k_l, D] array per prompted layer l
# (prompting methods, mora_jax.adapters.prompts; see `Encoder`).
Prompter = Callable[[jax.Array], Sequence[jax.Array]]


class Encoder(nnx.Module):

  def __init__(self, cfg: TextConfig | VisionConfig, *, dtype, rngs: nnx.Rngs):
    self.layers = nnx.List([EncoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)])

  def __call__(self, x: jax.Array, mask: jax.Array | None, call: Call | None = None, start: int = 0,
               stop: int | None = None, prompts: Sequence[jax.Array] = ()) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """Runs layers start..stop-1 on `x`, the input of layer `start`. Returns the last hidden state and the
    hidden states (the input, then each layer's output).

    prompts: [B, k_l, D] tokens for the first len(prompts) layers. Layer 0's go in front of `x`; a later
    layer's replace the first k_l positions (what the previous layer made of the prompts there); the other
    positions, and every position after the last prompted layer, carry on as ordinary tokens. `mask` must
    cover the longer sequence. Empty: the plain encoder.
    """
    if prompts and len(prompts) > len(self.layers):
      raise ValueError(f"{len(prompts)} prompted layers, but the encoder has {len(self.layers)} layers.")
    hidden_states = [x]
    for index, layer in enumerate(self.layers[start:stop], start):
      if index < len(prompts):
        tokens = prompts[index].astype(x.dtype)
        x = jnp.concatenate([tokens, x if index == 0 else x[:, tokens.shape[1]:]], axis=1)
      x = layer(x, mask, call)
      hidden_states.append(x)
    return x, tuple(hidden_states)


class TowerOutput(NamedTuple):
  last_hidden_state: jax.Array  # [B, L, D], before the final/post LayerNorm for vision (as Hugging Face)
  pooler_output: jax.Array  # [B, D], LayerNormed pooled token, before the projection
  # num_hidden_layers + 1 entries, as Hugging Face's hidden_states (entered at layer k: the last L + 1 - k)
  hidden_states: tuple[jax.Array, ...]


class Embedding(nnx.Module):

  def __init__(self, num: int, features: int, *, axes: tuple[str, str], std: float, dtype, rngs: nnx.Rngs):
    self.embedding = nnx.Param(_normal(rngs, (num, features), std, dtype), logical_axes=axes)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0)


class TextEmbeddings(nnx.Module):

  def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
    self.token_embedding = Embedding(cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"), std=0.02,
                                     dtype=dtype, rngs=rngs)
    self.position_embedding = Embedding(cfg.max_position_embeddings, cfg.hidden_size,
                                        axes=("positions", "embed"), std=0.02, dtype=dtype, rngs=rngs)

  def __call__(self, input_ids: jax.Array) -> jax.Array:
    return self.token_embedding(input_ids) + self.position_embedding(jnp.arange(input_ids.shape[-1]))


class TextTransformer(nnx.Module):
  """Causal text tower pooled at the EOS token (`CLIPTextModel`)."""

  def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
    self.config = cfg
    self.embeddings = TextEmbeddings(cfg, dtype=dtype, rngs=rngs)
    self.encoder = Encoder(cfg, dtype=dtype, rngs=rngs)
    self.final_layer_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               call: Call | None = None, prompts: Prompter | None = None) -> TowerOutput:
    """`prompts` (optional): per-layer prompt tokens (see `Encoder`), placed before the text; the causal mask
    spans prompts and text (every token sees all prompts), and the prompts are dropped before the readout,
    so `last_hidden_state` and the pooled EOS are the text positions' (`hidden_states` keep the prompts)."""
    x = self.embed(input_ids)
    layer_prompts = tuple(prompts(x)) if prompts is not None else ()
    return self.from_layer(x, 0, self.eos_positions(input_ids), attention_mask, call, layer_prompts)

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """The input of layer 0, [B, L, D]."""
    length = input_ids.shape[-1]
    if length > self.config.max_position_embeddings:
      raise ValueError(f"input_ids has length {length}, longer than max_position_embeddings "
                       f"{self.config.max_position_embeddings}.")
    return self.embeddings(input_ids)

  def hidden_at(self, input_ids: jax.Array, attention_mask: jax.Array | None, layer: int) -> jax.Array:
    """The input of layer `layer` (what `from_layer` continues from): layers 0..layer-1 of the frozen tower."""
    x = self.embed(input_ids)
    return self.encoder(x, self._mask(x.shape[1], attention_mask), None, 0, layer)[0]

  def from_layer(self, x: jax.Array, start: int, pool_positions: jax.Array, attention_mask: jax.Array | None,
                 call: Call | None = None, prompts: Sequence[jax.Array] = ()) -> TowerOutput:
    """Layers start.. on `x` (the input of layer `start`), the final LayerNorm, and the pooled token at
    `pool_positions` [B] (`eos_positions` of the input ids)."""
    extra = prompts[0].shape[1] if prompts else 0
    x, hidden_states = self.encoder(x, self._mask(x.shape[1], attention_mask, extra), call, start,
                                    prompts=prompts)
    x = self.final_layer_norm(x[:, extra:] if extra else x)
    return TowerOutput(x, x[jnp.arange(x.shape[0]), pool_positions], hidden_states)

  @staticmethod
  def _mask(length: int, attention_mask: jax.Array | None, extra: int = 0) -> jax.Array:
    """Causal over `extra` prompt positions then `length` text positions; padding text keys masked."""
    mask = jnp.tril(jnp.ones((extra + length, extra + length), bool))[None, None]
    if attention_mask is not None:
      keys = attention_mask.astype(bool)
      if extra:
        keys = jnp.concatenate([jnp.ones((keys.shape[0], extra), bool), keys], axis=1)
      mask = mask & keys[:, None, None, :]
    return mask

  def eos_positions(self, input_ids: jax.Array) -> jax.Array:
    # Hugging Face's two branches: configs from before transformers PR #24773 say eos_token_id == 2 and
    # pool at the largest id (OpenAI's EOT is the largest token); newer ones pool at the first EOS id.
    if self.config.eos_token_id == 2:
      return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)


class PatchEmbedding(nnx.Module):
  """Conv2d(kernel = stride = patch, no bias) as one matmul over flattened patches; kernel in Flax HWIO."""

  def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
    self.config = cfg
    p = cfg.patch_size
    self.kernel = nnx.Param(_normal(rngs, (p, p, cfg.num_channels, cfg.hidden_size), 0.02, dtype),
                            logical_axes=("patch_h", "patch_w", "channels", "embed"))

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    """NCHW pixels -> [B, num_patches, D], patches in row-major grid order (as torch's flatten(2))."""
    cfg = self.config
    b, c, h, w = pixel_values.shape
    if (c, h, w) != (cfg.num_channels, cfg.image_size, cfg.image_size):
      raise ValueError(f"pixel_values has shape {pixel_values.shape}; this model expects "
                       f"[B, {cfg.num_channels}, {cfg.image_size}, {cfg.image_size}] (NCHW, as "
                       "CLIPImageProcessor returns).")
    kernel = self.kernel[...]
    p, g = cfg.patch_size, cfg.image_size // cfg.patch_size
    patches = pixel_values.astype(kernel.dtype).reshape(b, c, g, p, g, p).transpose(0, 2, 4, 3, 5, 1)
    return patches.reshape(b, g * g, p * p * c) @ kernel.reshape(p * p * c, -1)


class VisionEmbeddings(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.class_embedding = nnx.Param(_normal(rngs, (d,), d**-0.5, dtype), logical_axes=("embed",))
    self.patch_embedding = PatchEmbedding(cfg, dtype=dtype, rngs=rngs)
    self.position_embedding = Embedding(cfg.num_patches + 1, d, axes=("positions", "embed"), std=0.02,
                                        dtype=dtype, rngs=rngs)

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    patches = self.patch_embedding(pixel_values)
    cls = jnp.broadcast_to(self.class_embedding[...], (patches.shape[0], 1, patches.shape[-1]))
    return jnp.concatenate([cls, patches], axis=1) + self.position_embedding.embedding[...]


class VisionTransformer(nnx.Module):
  """ViT image tower pooled at the class token (`CLIPVisionModel`)."""

  def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
    self.embeddings = VisionEmbeddings(cfg, dtype=dtype, rngs=rngs)
    self.pre_layrnorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)  # sic: Hugging Face's spelling
    self.encoder = Encoder(cfg, dtype=dtype, rngs=rngs)
    self.post_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

  def __call__(self, pixel_values: jax.Array, call: Call | None = None,
               prompts: Prompter | None = None) -> TowerOutput:
    """`prompts` (optional): per-layer prompt tokens (see `Encoder`), placed after `pre_layrnorm`, before the
    class token; the readout is the class token at its shifted position, and `last_hidden_state` drops the
    prompt positions (`hidden_states` keep them)."""
    x = self.embed(pixel_values)
    return self.from_layer(x, 0, call, tuple(prompts(x)) if prompts is not None else ())

  def embed(self, pixel_values: jax.Array) -> jax.Array:
    """The input of layer 0, [B, 1 + num_patches, D]."""
    return self.pre_layrnorm(self.embeddings(pixel_values))

  def hidden_at(self, pixel_values: jax.Array, layer: int) -> jax.Array:
    """The input of layer `layer` (what `from_layer` continues from): layers 0..layer-1 of the frozen tower."""
    return self.encoder(self.embed(pixel_values), None, None, 0, layer)[0]

  def from_layer(self, x: jax.Array, start: int, call: Call | None = None,
                 prompts: Sequence[jax.Array] = ()) -> TowerOutput:
    """Layers start.. on `x` (the input of layer `start`), then the class token's post-LayerNorm."""
    x, hidden_states = self.encoder(x, None, call, start, prompts=prompts)
    if prompts:
      x = x[:, prompts[0].shape[1]:]
    return TowerOutput(x, self.post_layernorm(x[:, 0]), hidden_states)


class CLIP(nnx.Module):
  """Two-tower CLIP with Hugging Face `CLIPModel`'s parameters and methods."""

  def __init__(self, config: CLIPConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.text_model = TextTransformer(config.text, dtype=dtype, rngs=rngs)
    self.vision_model = VisionTransformer(config.vision, dtype=dtype, rngs=rngs)
    self.visual_projection = Linear(config.vision.hidden_size, config.projection_dim, use_bias=False,
                                    axes=("embed", "proj"), std=config.vision.hidden_size**-0.5, dtype=dtype,
                                    rngs=rngs)
    self.text_projection = Linear(config.text.hidden_size, config.projection_dim, use_bias=False,
                                  axes=("embed", "proj"), std=config.text.hidden_size**-0.5, dtype=dtype,
                                  rngs=rngs)
    self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init_value, jnp.float32), logical_axes=())

  def get_image_features(self, pixel_values: jax.Array, call: Call | None = None,
                         prompts: Prompter | None = None) -> jax.Array:
    """pixel_values float [B, 3, H, W] (NCHW, as CLIPImageProcessor returns) -> float32 [B, projection_dim].

    `call` (dropout stream, hand-overs) only matters once adapters are applied; None is deterministic.
    `prompts`: a prompting method's tokens (VisionTransformer); None is plain CLIP.
    """
    pooled = self.vision_model(pixel_values, call, prompts).pooler_output
    return self.visual_projection(pooled).astype(jnp.float32)

  def get_text_features(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                        call: Call | None = None, prompts: Prompter | None = None) -> jax.Array:
    """input_ids int [B, L], attention_mask {0,1} [B, L] -> float32 [B, projection_dim]; `prompts` as in
    get_image_features (TextTransformer)."""
    pooled = self.text_model(input_ids, attention_mask, call, prompts).pooler_output
    return self.text_projection(pooled).astype(jnp.float32)

  def image_features_from(self, hidden: jax.Array, start: int, call: Call | None = None) -> jax.Array:
    """`get_image_features` continued from the input of vision layer `start` (`vision_model.hidden_at`)."""
    pooled = self.vision_model.from_layer(hidden.astype(self.visual_projection.kernel.dtype), start, call)
    return self.visual_projection(pooled.pooler_output).astype(jnp.float32)

  def text_features_from(self, hidden: jax.Array, start: int, pool_positions: jax.Array,
                         attention_mask: jax.Array | None, call: Call | None = None) -> jax.Array:
    """`get_text_features` continued from the input of text layer `start` (`text_model.hidden_at`)."""
    pooled = self.text_model.from_layer(hidden.astype(self.text_projection.kernel.dtype), start, pool_positions,
                                        attention_mask, call)
    return self.text_projection(pooled.pooler_output).astype(jnp.float32)

  def __call__(self, pixel_values: jax.Array, input_ids: jax.Array,
               attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(logits_per_image [B_img, B_txt], logits_per_text) from L2-normalised features, as CLIPModel."""
    image = self.get_image_features(pixel_values)
    text = self.get_text_features(input_ids, attention_mask)
    image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
    text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
    logits_per_text = jnp.exp(self.logit_scale[...]) * text @ image.T
    return logits_per_text.T, logits_per_text


def init(config: CLIPConfig, seed: int = 0, dtype=jnp.float32) -> CLIP:
  """A randomly initialised CLIP (Hugging Face's initialisation scheme)."""
  return CLIP(config, dtype=dtype, rngs=nnx.Rngs(seed))


def count_params(module: nnx.Module) -> int:
  return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(module, nnx.Param)))
