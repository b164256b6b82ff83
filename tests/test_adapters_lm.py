"""MokA and LoRA attached to a decoder LM's projections (moka.DecoderMokA), checked at the level of the whole LM.

References are built independently from `lora.LoRALinear` (the PEFT-exact LoRA), one per modality. Every B is
random (not the zero init), so each adapter changes the logits by > 1e-2 and the comparisons can fail; they
allow 1e-5 (float32; the same matmuls in a different grouping differ by ~1e-7). Cached decoding against a full
recomputation allows 2e-5 of the logits' scale instead: there every matmul has another shape (one row against the
whole sequence) and the attention reduces over other lengths, so XLA picks other kernels, and which ones changes
with its version; measured: up to 3e-6 absolute with jax 0.10, 2.7e-5 (8e-6 of the scale, |logit| <= 3.4) with
jax 0.12. MokA with lambda 0 (or with decoder_masks="first_layer", whose layers past 0 are LoRA with A_text)
against per-modality LoRA allows 1e-4 of the logits' scale: with jax 0.10 the two are bitwise equal; with jax
0.12.0.1 they differ by up to 2.6e-5 (7.6e-6 of the scale, |logit| <= 3.4) with XLA's optimizations on and by
1.2e-4 (3.6e-5 of the scale) with most of them off, as the test suite compiles (docs/testing.md): its CPU kernels
round the per-modality products differently. A wrong term moves the logits by > 1e-2, 30x the bound.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mora_jax import adapters
from mora_jax.adapters import common, moka, partition
from mora_jax.adapters import lm as lm_adapters
from mora_jax.adapters.lora import LoRAConfig, LoRALinear
from mora_jax.models import llama

TOLERANCE = 1e-5
RELATIVE_TOLERANCE = 2e-5
LAMBDA_ZERO_RELATIVE_TOLERANCE = 1e-4
CONFIG = llama.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2, eos_token_id=None)
IMAGE_ROWS, QUESTION_ROWS = 4, 5


def adapted_lm(**overrides) -> llama.LlamaForCausalLM:
  """The tiny LM with MokA (or `method`) on every projection of every layer (dropout off) whose B are random, so
  that every adapter is active; MokA reads the modalities and keys in every layer unless `decoder_masks` says
  otherwise."""
  values = {"method": "moka", "targets": common.DECODER_TARGETS, "start_layer": 0, "alpha": 16.0, "dropout": 0.0,
            **overrides}
  if values["method"] == "moka":
    values.setdefault("decoder_masks", "every_layer")
  cfg = adapters.from_config(values)
  model = llama.init(CONFIG, seed=0)
  cfg.attach(model, rngs=nnx.Rngs(1))
  state = nnx.state(model, partition.Decoder)
  keys = iter(jax.random.split(jax.random.key(2), 1000))
  nnx.update(model, jax.tree.map(lambda v: jax.random.normal(next(keys), v.shape) * 0.3, state))
  return model


def inputs(batch: int = 2):
  """[image rows; question rows] embeddings and the call: the question rows are the keys."""
  length = IMAGE_ROWS + QUESTION_ROWS
  embeds = jax.random.normal(jax.random.key(5), (batch, length, CONFIG.hidden_size))
  modality = jnp.asarray([lm_adapters.IMAGE] * IMAGE_ROWS + [lm_adapters.TEXT] * QUESTION_ROWS)
  modality = jnp.broadcast_to(modality, (batch, length))
  call = llama.TokenCall(modality=modality, key_mask=modality == lm_adapters.TEXT,
                         padding=jnp.zeros((batch, length), bool))
  return embeds, call


class PerModalityLoRA(nnx.Module):
  """Reference: one PEFT LoRA per modality (A_m, the shared B), each row taking its modality's LoRA."""

  def __init__(self, adapted: moka.DecoderMokA, modalities: tuple[int, ...]):
    layer = adapted.moka
    self.modalities = modalities
    self.loras = nnx.List()
    for m in modalities:
      lora = LoRALinear(layer.base, "text", LoRAConfig(rank=layer.cfg.rank, alpha=layer.cfg.alpha, dropout=0.0),
                        rngs=nnx.Rngs(0))
      lora.lora_A.set_value(layer.lora_A[m])
      lora.lora_B.set_value(layer.lora_B[...])
      self.loras.append(lora)

  def __call__(self, x, call=None):
    if len(self.loras) == 1:
      return self.loras[0](x)
    return jnp.where((call.modality == self.modalities[1])[..., None], self.loras[1](x), self.loras[0](x))


def replace_projections(model, make, start_layer: int = 0):
  for layer in list(model.model.layers)[start_layer:]:
    for parent in (layer.self_attn, layer.mlp):
      for name in vars(parent):
        if isinstance(getattr(parent, name), moka.DecoderMokA):
          setattr(parent, name, make(getattr(parent, name)))
  return model


def logits(model, embeds, call):
  return np.asarray(model(inputs_embeds=embeds, call=call)[0])


def test_lambda_zero_equals_per_modality_lora():
  model = adapted_lm(lam=0.0)
  embeds, call = inputs()
  got = logits(model, embeds, call)
  reference = replace_projections(
      model, lambda p: PerModalityLoRA(p, (lm_adapters.TEXT, lm_adapters.IMAGE)))
  expected = logits(reference, embeds, call)
  np.testing.assert_allclose(got, expected, atol=LAMBDA_ZERO_RELATIVE_TOLERANCE * np.abs(expected).max(), rtol=0)
  assert np.abs(got - logits(adapted_lm(lam=1.0), embeds, call)).max() > 1e-2, "lambda has no effect"


def adapted_projections(model):
  """(layer index, DecoderMokA) of every adapted projection, in a fixed order."""
  return [(i, getattr(parent, name)) for i, layer in enumerate(model.model.layers)
          for parent in (layer.self_attn, layer.mlp) for name in sorted(vars(parent))
          if isinstance(getattr(parent, name), moka.DecoderMokA)]


def test_first_layer_masks_are_moka_in_layer_0_and_text_lora_past_it():
  """decoder_masks="first_layer" transcribes the authors' visual-text code with a KV cache (docs/mllm.md): their
  masks reach decoder layer 0, whose projections compute exactly the full MokA layer; every later layer gets no
  masks and adds lora_B(lora_A['text'](x)) * scaling to every row, image rows included: PEFT LoRA with A_text (the
  lambda-0 bound: the per-modality products round differently)."""
  first = adapted_lm(lam=1.0, decoder_masks="first_layer")
  every = adapted_lm(lam=1.0)
  embeds, call = inputs()
  text_rows = llama.TokenCall(modality=jnp.full_like(call.modality, lm_adapters.TEXT),
                              key_mask=jnp.zeros_like(call.key_mask), padding=call.padding)
  keys = iter(jax.random.split(jax.random.key(7), 100))
  for (layer, got), (_, default) in zip(adapted_projections(first), adapted_projections(every), strict=True):
    x = jax.random.normal(next(keys), (*call.modality.shape, default.moka.base.kernel.shape[0]))
    np.testing.assert_array_equal(got(x, call), default(x, call if layer == 0 else text_rows))
  got, default_logits = logits(first, embeds, call), logits(every, embeds, call)
  reference = replace_projections(every, lambda p: PerModalityLoRA(p, (lm_adapters.TEXT,)), start_layer=1)
  expected = logits(reference, embeds, call)
  np.testing.assert_allclose(got, expected, atol=LAMBDA_ZERO_RELATIVE_TOLERANCE * np.abs(expected).max(), rtol=0)
  assert np.abs(got - default_logits).max() > 1e-2, "the option changes nothing"


def test_lora_method_is_peft_lora_with_one_a_for_every_token():
  model = adapted_lm(method="lora")
  embeds, call = inputs()
  reference = replace_projections(adapted_lm(method="lora"), lambda p: PerModalityLoRA(p, (lm_adapters.TEXT,)))
  np.testing.assert_allclose(logits(model, embeds, call), logits(reference, embeds, call), atol=TOLERANCE, rtol=0)


def test_text_rows_do_not_depend_on_image_rows_through_the_adapter():
  """With the question before the image, causal attention hides the image from the question rows, so any change
  of the question rows' logits would come from the adapter: none with lambda 1 vs 0 or with other image rows."""
  embeds, call = inputs()
  order = np.r_[IMAGE_ROWS:IMAGE_ROWS + QUESTION_ROWS, 0:IMAGE_ROWS]
  embeds = embeds[:, order]
  call = dataclasses.replace(call, modality=call.modality[:, order], key_mask=call.key_mask[:, order])
  text = slice(0, QUESTION_ROWS)
  base = logits(adapted_lm(lam=0.0), embeds, call)
  strong = logits(adapted_lm(lam=1.0), embeds, call)
  other_image = logits(adapted_lm(lam=1.0), embeds.at[:, QUESTION_ROWS:].multiply(-3.0), call)
  np.testing.assert_array_equal(strong[:, text], base[:, text])
  np.testing.assert_array_equal(other_image[:, text], strong[:, text])
  assert np.abs(strong[:, QUESTION_ROWS:] - base[:, QUESTION_ROWS:]).max() > 1e-2


def test_sample_without_image_tokens_equals_lora_with_a_text():
  """Sample 0 has image rows, sample 1 only text rows (left padding where sample 0 has its image): sample 1's
  logits are those of plain LoRA with A_text."""
  model = adapted_lm(lam=0.5)
  embeds, call = inputs()
  no_image = jnp.arange(IMAGE_ROWS + QUESTION_ROWS) >= IMAGE_ROWS
  mask = jnp.stack([jnp.ones_like(no_image), no_image])
  modality = call.modality.at[1].set(lm_adapters.TEXT)
  call = dataclasses.replace(call, modality=modality, key_mask=call.key_mask.at[1].set(no_image),
                             padding=~mask)
  got = np.asarray(model(attention_mask=mask, inputs_embeds=embeds, call=call)[0])
  reference = replace_projections(model, lambda p: PerModalityLoRA(p, (lm_adapters.TEXT,)))
  expected = np.asarray(reference(inputs_embeds=embeds[1:, IMAGE_ROWS:])[0])
  np.testing.assert_allclose(got[1, IMAGE_ROWS:], expected[0, -QUESTION_ROWS:], atol=TOLERANCE, rtol=0)


def test_cached_generation_equals_full_recomputation():
  """Prefill [image; question] with the full MokA path, decode 5 tokens (text rows, no keys); then recompute the
  whole sequence in one uncached pass: the same argmax at every generated position, logits within 2e-5 of their
  scale (the module docstring says why not 1e-5)."""
  model = adapted_lm(lam=1.0)
  embeds, call = inputs()
  mask = jnp.ones(call.modality.shape, jnp.int32)
  new = lm_adapters.generate(model, embeds, mask, call, max_new_tokens=5)
  assert len(set(np.asarray(new).ravel().tolist())) > 1, "degenerate generation: the check would prove little"
  full_embeds = jnp.concatenate([embeds, model.embed(new)], axis=1)
  generated = lm_adapters.text_call(new)
  full_call = llama.TokenCall(**{f: jnp.concatenate([getattr(call, f), getattr(generated, f)], 1)
                                 for f in ("modality", "key_mask", "padding")})
  full = logits(model, full_embeds, full_call)
  prompt = IMAGE_ROWS + QUESTION_ROWS
  np.testing.assert_array_equal(full[:, prompt - 1:-1].argmax(-1), np.asarray(new))
  # And step by step: the cached logits of each new token equal the full pass's.
  cache = llama.init_cache(CONFIG, 2, prompt + 5)
  first, cache = model(attention_mask=mask, inputs_embeds=embeds, call=call, cache=cache)
  steps = [first[:, -1:]]
  for t in range(4):
    ids = new[:, t:t + 1]
    out, cache = model(ids, jnp.ones_like(ids), call=lm_adapters.text_call(ids), cache=cache)
    steps.append(out)
  expected = full[:, prompt - 1:-1]
  np.testing.assert_allclose(np.concatenate(steps, 1), expected,
                             atol=RELATIVE_TOLERANCE * np.abs(expected).max(), rtol=0)


def test_init_is_the_frozen_lm_and_only_targets_from_start_layer_are_adapted():
  model = llama.init(CONFIG, seed=0)
  adapters.MokAConfig(targets=("q_proj", "down_proj"), start_layer=1).attach(model, rngs=nnx.Rngs(1))
  embeds, call = inputs()
  np.testing.assert_array_equal(logits(model, embeds, call), logits(llama.init(CONFIG, seed=0), embeds, None))
  adapted = {(i, n) for i, layer in enumerate(model.model.layers) for parent in (layer.self_attn, layer.mlp)
             for n in vars(parent) if isinstance(getattr(parent, n), moka.DecoderMokA)}
  assert adapted == {(1, "q_proj"), (1, "down_proj"), (2, "q_proj"), (2, "down_proj")}
  a_shapes = {v.shape for v in jax.tree.leaves(nnx.state(model, partition.Decoder)) if v.ndim == 3}
  assert a_shapes == {(2, 32, 4), (2, 48, 4)}  # one A per modality


def test_targets_methods_and_layers_are_checked_against_the_lm():
  def attach(values):
    adapters.from_config(values).attach(llama.init(CONFIG), rngs=nnx.Rngs(0))

  with pytest.raises(ValueError, match=r"adapter.targets=\('fc1',\): a decoder LM has no \['fc1'\]; its projections "
                     r"are \('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'\)\.$"):
    attach({"method": "moka", "targets": ("fc1",), "start_layer": 0})
  with pytest.raises(ValueError, match=r"targets \('w_proj',\): each must be one of"):
    adapters.from_config({"method": "lora", "targets": ("w_proj",)})  # no model has it: an error before any model
  for method in ("mora", "dora"):
    with pytest.raises(ValueError, match=f"adapter method '{method}' adapts CLIP towers only"):
      attach({"method": method, "start_layer": 0})
  with pytest.raises(ValueError, match="prompt method 'dcp' prompts a CLIP model's towers, not a LlamaForCausalLM"):
    attach({"method": "dcp"})
  with pytest.raises(ValueError, match="start_layer=3 but the LM has only 3 layers"):
    attach({"method": "lora", "targets": ("o_proj",), "start_layer": 3})
