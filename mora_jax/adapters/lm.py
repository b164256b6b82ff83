"""Passes of a decoder LM (mora_jax.models.llama) whose projections carry adapters: the modality ids its
`TokenCall` gives every token, and generation.

MokA and LoRA attach to a decoder LM as to CLIP (`MokAConfig(...).attach(lm, rngs=...)`, or
`registry.from_config` of the run config's adapter section): every targeted projection becomes a
`moka.DecoderMokA`, which reads the pass's `llama.TokenCall` (modality id, question-key mask and padding per token):
- "moka": one A per modality, image rows attend over the question rows in rank space (lambda, tau = sqrt(r)),
  one shared B. lambda 0 leaves per-modality A + shared B.
- "lora": the same layer with a single A that every token uses (MokA with one modality is plain LoRA).

Generation: the prompt (image and question tokens) is prefilled with the full MokA path; each newly generated
token is a text row with no key (`text_call`), i.e. delta = scale * B A_text x, while the cached keys and values
of the prompt keep their MokA computation. By default (`MokAConfig.decoder_masks="first_layer"`) only decoder layer
0 runs the full MokA path, in training and in the prefill, as the MokA authors' visual-text code that produced
their published numbers: a layer there drops the masks once the KV cache holds layer 0's keys, and its training
passes have a cache too (use_cache on), so its other layers run LoRA with the text A on every token.
`decoder_masks="every_layer"` runs the full path in every adapted layer, as their audio-visual-text code
(docs/mllm.md). Generated tokens take the text A in every layer, as theirs.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from mora_jax.models import llama
from mora_jax.models.llama import LlamaForCausalLM, TokenCall

TEXT, IMAGE = 0, 1  # modality ids
NUM_MODALITIES = 2


def text_call(ids: jax.Array, rngs: nnx.Rngs | None = None) -> TokenCall:
  """The call of text tokens that are no keys (generated tokens): ids [B, L], any dtype (only the shape is read)."""
  return TokenCall(rngs=rngs, modality=jnp.full(ids.shape, TEXT, jnp.int32), key_mask=jnp.zeros(ids.shape, bool),
                   padding=jnp.zeros(ids.shape, bool))


def generate(lm: LlamaForCausalLM, inputs_embeds: jax.Array, attention_mask: jax.Array, call: TokenCall, *,
             max_new_tokens: int, temperature: float = 0.0, key: jax.Array | None = None,
             eos_token_id: int | None = None, pad_token_id: int = 0) -> jax.Array:
  """Prefills left-padded prompt embeddings [B, L, D] with `call` (each layer's MokA path), then decodes new text
  tokens: int [B, max_new_tokens]."""
  b, length, _ = inputs_embeds.shape
  cache = llama.init_cache(lm.config, b, length + max_new_tokens, inputs_embeds.dtype)
  logits, cache = lm(attention_mask=attention_mask, inputs_embeds=inputs_embeds, call=call, cache=cache)
  return llama.decode(lm, logits[:, -1], cache, max_new_tokens, temperature=temperature, key=key,
                      eos_token_id=eos_token_id, pad_token_id=pad_token_id, call_for_token=text_call)
