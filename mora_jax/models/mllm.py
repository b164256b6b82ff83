"""A LLaVA-style multimodal LLM: a frozen CLIP vision tower, a projector from its patch tokens to the LM width,
and a frozen decoder LM (mora_jax.models.llama) whose projections carry adapters (mora_jax.adapters.lm).

One sample is the sequence [image tokens; text tokens]. The text part is a left-padded prompt ("<s>question: ...
answer:") followed by the right-padded answer ("red</s>"), so padding may sit between the image and the prompt;
positions count valid tokens only, so it changes nothing. Per token (MOKA_NATIVE's masks, in our words):
- modality: image for the image tokens, text otherwise;
- question keys (MokA's keys and values): valid prompt tokens, i.e. non-image tokens before the answer and after
  the image tokens, never answer tokens;
- padding: invalid tokens, and every image token of a sample whose image is missing (it has no image tokens).

The vision tower is frozen and deterministic, so training reads its features from a per-image cache
(`image_features` once per image); `image_tokens` then only runs the projector.
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mora_jax.adapters import lm as lm_adapters
from mora_jax.adapters import partition
from mora_jax.models import llama
from mora_jax.models.modeling import VisionTransformer

PROJECTORS = ("linear", "mlp2x_gelu")


class ProjectorParam(partition.Trainable):
  """The projector's parameters (trained in stage 1, and optionally in stage 2)."""


class Projector(nnx.Module):
  """Vision width -> LM width: one linear layer, or LLaVA-1.5's two with a GELU between ("mlp2x_gelu")."""

  def __init__(self, kind: str, d_in: int, d_out: int, *, rngs: nnx.Rngs):
    if kind not in PROJECTORS:
      raise ValueError(f"projector={kind!r}: use one of {PROJECTORS}.")
    dims = [(d_in, d_out)] if kind == "linear" else [(d_in, d_out), (d_out, d_out)]
    init = nnx.initializers.lecun_normal()
    self.kernels = nnx.List([ProjectorParam(init(rngs.params(), shape, jnp.float32)) for shape in dims])
    self.biases = nnx.List([ProjectorParam(jnp.zeros((shape[1],), jnp.float32)) for shape in dims])

  def __call__(self, x: jax.Array) -> jax.Array:
    for i, (kernel, bias) in enumerate(zip(self.kernels, self.biases)):
      if i:
        x = jax.nn.gelu(x, approximate=False)
      x = x.astype(jnp.float32) @ kernel[...] + bias[...]
    return x


@dataclasses.dataclass(frozen=True)
class Batch:
  """Model inputs of one batch (all arrays, so a jitted function takes it as a pytree).

  features float [B, P, Dv]: the vision tower's patch features (those of the white image where the config says
  so); image_present bool [B]; input_ids int [B, T]; text_valid bool [B, T]; prompt bool [B, T] (valid prompt
  tokens, the question keys); answer bool [B, T] (answer tokens, the loss targets)."""
  features: jax.Array
  image_present: jax.Array
  input_ids: jax.Array
  text_valid: jax.Array
  prompt: jax.Array
  answer: jax.Array


jax.tree_util.register_dataclass(Batch, data_fields=[f.name for f in dataclasses.fields(Batch)], meta_fields=[])


class MLLM(nnx.Module):

  def __init__(self, vision: VisionTransformer, lm: llama.LlamaForCausalLM, projector: str, *, rngs: nnx.Rngs):
    self.vision = vision
    self.lm = lm
    vision_width = vision.embeddings.class_embedding.get_value().shape[-1]
    self.projector = Projector(projector, vision_width, lm.config.hidden_size, rngs=rngs)

  def image_features(self, pixel_values: jax.Array) -> jax.Array:
    """The frozen vision tower's patch tokens of the penultimate layer (LLaVA's choice), [B, P, Dv]."""
    return self.vision(pixel_values).hidden_states[-2][:, 1:]

  def sequence(self, batch: Batch, rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array, llama.TokenCall]:
    """(embeddings [B, P + T, D], attention mask, the pass's TokenCall) of [image tokens; text tokens]."""
    image = self.projector(batch.features).astype(jnp.float32)
    text = self.lm.embed(batch.input_ids).astype(jnp.float32)
    b, p = image.shape[:2]
    image_valid = jnp.broadcast_to(batch.image_present[:, None], (b, p))
    valid = jnp.concatenate([image_valid, batch.text_valid], 1)
    modality = jnp.concatenate([jnp.full((b, p), lm_adapters.IMAGE, jnp.int32),
                                jnp.full(batch.input_ids.shape, lm_adapters.TEXT, jnp.int32)], 1)
    keys = jnp.concatenate([jnp.zeros((b, p), bool), batch.prompt & batch.text_valid], 1)
    call = llama.TokenCall(rngs=rngs, modality=modality, key_mask=keys, padding=~valid)
    return jnp.concatenate([image, text], 1), valid, call

  def __call__(self, batch: Batch, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Logits of the text part, float32 [B, T, vocab]: logits[:, t] predicts input_ids[:, t + 1]."""
    embeds, valid, call = self.sequence(batch, rngs)
    logits, _ = self.lm(attention_mask=valid, inputs_embeds=embeds, call=call)
    return logits[:, batch.features.shape[1]:]

  def generate(self, batch: Batch, max_new_tokens: int, *, eos_token_id: int, pad_token_id: int) -> jax.Array:
    """Greedy answers to the prompts (the batch's text part must hold no answer tokens): int [B, new]."""
    embeds, valid, call = self.sequence(batch)
    return lm_adapters.generate(self.lm, embeds, valid, call, max_new_tokens=max_new_tokens,
                                eos_token_id=eos_token_id, pad_token_id=pad_token_id)


def answer_loss(logits: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
  """(mean cross-entropy over answer tokens, their count): the token at t is predicted by the logits at t - 1."""
  weights = batch.answer[:, 1:].astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch.input_ids[:, 1:])
  return (losses * weights).sum() / jnp.maximum(weights.sum(), 1.0), weights.sum()

