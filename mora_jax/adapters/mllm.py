"""A LLaVA-style multimodal LLM: a frozen CLIP vision tower, a projector from its patch tokens to the LM width,
and a frozen decoder LM (mora_jax.models.llama) whose projections carry adapters (MokA or LoRA, attached as to CLIP:
`Method.attach`; their passes: mora_jax.adapters.lm).

One sample is the sequence [<s>; image tokens; prompt ("question: ... answer:"); answer (" red</s>")], its
padding moved to the front (`MLLM.sequence`), so that prompts end the sequence for generation, and <s> keeps
the first position, as in the LM's pre-training. Per token (the authors' masks, in our words):
- modality: image for the image tokens, text otherwise;
- question keys (MokA's keys and values): valid prompt tokens, i.e. non-image tokens before the answer and after
  the image tokens, never answer tokens;
- padding: invalid tokens, and every image token of a sample whose image is missing (it has no image tokens).

The vision tower is frozen and deterministic, so training reads its features from a per-image cache
(`image_features` once per image), and a step runs the projector on cached features.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mora_jax.adapters import lm as lm_adapters
from mora_jax.adapters import partition
from mora_jax.models import llama
from mora_jax.models.modeling import VisionTransformer

PROJECTORS = ("linear", "mlp2x_gelu")
# The vision tower's tokens that become image tokens: "patches", the penultimate layer's patch tokens (LLaVA's
# choice); "patches+class", those and the last layer's class token (the contrastively trained summary; docs/mllm.md).
IMAGE_TOKENS = ("patches", "patches+class")


class Projector(nnx.Module):
  """Vision width -> LM width: one linear layer, or LLaVA-1.5's two with a GELU between ("mlp2x_gelu")."""

  def __init__(self, kind: str, d_in: int, d_out: int, *, rngs: nnx.Rngs):
    if kind not in PROJECTORS:
      raise ValueError(f"projector={kind!r}: use one of {PROJECTORS}.")
    dims = [(d_in, d_out)] if kind == "linear" else [(d_in, d_out), (d_out, d_out)]
    init = nnx.initializers.lecun_normal()
    self.kernels = nnx.List([partition.Projector(init(rngs.params(), shape, jnp.float32)) for shape in dims])
    self.biases = nnx.List([partition.Projector(jnp.zeros((shape[1],), jnp.float32)) for shape in dims])

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


class Sequence(NamedTuple):
  """One batch as the decoder reads it: embeddings [B, S, D], valid rows, the pass's TokenCall, and per row the
  token id (0 for image rows) and whether it is an answer token (a loss target)."""
  embeds: jax.Array
  valid: jax.Array
  call: llama.TokenCall
  ids: jax.Array
  answer: jax.Array


class MLLM(nnx.Module):
  partitions = partition.MLLM

  def __init__(self, vision: VisionTransformer, lm: llama.LlamaForCausalLM, projector: str,
               image_tokens: str = "patches", *, rngs: nnx.Rngs):
    if image_tokens not in IMAGE_TOKENS:
      raise ValueError(f"image_tokens={image_tokens!r}: use one of {IMAGE_TOKENS}.")
    self.vision = vision
    self.lm = lm
    self.image_tokens = image_tokens
    vision_width = vision.embeddings.class_embedding.get_value().shape[-1]
    self.projector = Projector(projector, vision_width, lm.config.hidden_size, rngs=rngs)

  def image_features(self, pixel_values: jax.Array) -> jax.Array:
    """The frozen vision tower's tokens that the projector maps to image tokens (IMAGE_TOKENS), [B, P, Dv]."""
    hidden = self.vision(pixel_values).hidden_states
    patches = hidden[-2][:, 1:]
    return patches if self.image_tokens == "patches" else jnp.concatenate([patches, hidden[-1][:, :1]], 1)

  def sequence(self, batch: Batch, rngs: nnx.Rngs | None = None) -> Sequence:
    """[<s>; image tokens; text tokens] with every invalid row moved to the front (a stable sort on validity), so
    that the valid rows are contiguous and end the sequence: the row before a token is the one that predicts
    it, and generation continues after the last row."""
    image = self.projector(batch.features).astype(jnp.float32)
    text = self.lm.embed(batch.input_ids).astype(jnp.float32)
    b, p = image.shape[:2]
    t = batch.input_ids.shape[1]
    bos = jnp.full((b, 1), self.lm.config.bos_token_id, jnp.int32)
    embeds = jnp.concatenate([self.lm.embed(bos).astype(jnp.float32), image, text], 1)
    rows = lambda first, image_rows, text_rows: jnp.concatenate([first, image_rows, text_rows], 1)  # noqa: E731
    valid = rows(jnp.ones((b, 1), bool), jnp.broadcast_to(batch.image_present[:, None], (b, p)), batch.text_valid)
    modality = rows(jnp.full((b, 1), lm_adapters.TEXT), jnp.full((b, p), lm_adapters.IMAGE),
                    jnp.full((b, t), lm_adapters.TEXT)).astype(jnp.int32)
    # The keys: prompt tokens, which all come after the image tokens (<s> comes before them: never a key).
    keys = rows(jnp.zeros((b, 1), bool), jnp.zeros((b, p), bool), batch.prompt & batch.text_valid)
    ids = rows(bos, jnp.zeros((b, p), jnp.int32), batch.input_ids.astype(jnp.int32))
    answer = rows(jnp.zeros((b, 1), bool), jnp.zeros((b, p), bool), batch.answer)
    order = jnp.argsort(valid, axis=1, stable=True)
    take = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)  # noqa: E731
    valid, modality, keys, ids, answer = (take(x) for x in (valid, modality, keys, ids, answer))
    call = llama.TokenCall(rngs=rngs, modality=modality, key_mask=keys, padding=~valid)
    return Sequence(take(embeds), valid, call, ids, answer)

  def __call__(self, batch: Batch, rngs: nnx.Rngs | None = None) -> tuple[jax.Array, Sequence]:
    """(logits float32 [B, S, vocab], the sequence): logits[:, s] predicts the token of row s + 1."""
    seq = self.sequence(batch, rngs)
    logits, _ = self.lm(attention_mask=seq.valid, inputs_embeds=seq.embeds, call=seq.call)
    return logits, seq

  def generate(self, batch: Batch, max_new_tokens: int, *, eos_token_id: int, pad_token_id: int) -> jax.Array:
    """Greedy answers to the prompts (the batch's text part must hold no answer tokens): int [B, new]."""
    seq = self.sequence(batch)
    return lm_adapters.generate(self.lm, seq.embeds, seq.valid, seq.call, max_new_tokens=max_new_tokens,
                                eos_token_id=eos_token_id, pad_token_id=pad_token_id)


def answer_loss(logits: jax.Array, seq: Sequence) -> tuple[jax.Array, jax.Array]:
  """(mean cross-entropy over answer tokens, their count): row s's token is predicted by row s - 1's logits."""
  weights = seq.answer[:, 1:].astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], seq.ids[:, 1:])
  return (losses * weights).sum() / jnp.maximum(weights.sum(), 1.0), weights.sum()
