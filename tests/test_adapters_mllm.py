"""The multimodal LLM's pieces (mora_jax.adapters.mllm): the sequence it builds, the answer-only loss, the
projector."""

import numpy as np
import pytest
from flax import nnx

from mora_jax.adapters import mllm as mllm_lib
from mora_jax.models import config, llama, modeling


def test_answer_loss_reads_answer_tokens_only():
  """Row s's token is predicted by row s - 1: only the logits of the rows before answer tokens count."""
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 50, (2, 6))
  answer = np.zeros((2, 6), bool)
  answer[:, 4:] = True
  seq = mllm_lib.Sequence(embeds=None, valid=np.ones((2, 6), bool), call=None, ids=ids, answer=answer)
  logits = rng.normal(size=(2, 6, 50)).astype(np.float32)
  loss, count = mllm_lib.answer_loss(logits, seq)
  assert count == 4
  changed = logits.copy()
  changed[:, 5] += 5.0
  changed[:, :3] += 5.0
  np.testing.assert_allclose(mllm_lib.answer_loss(changed, seq)[0], loss, rtol=1e-6)
  changed[:, 3] += rng.normal(size=50).astype(np.float32)
  assert abs(float(mllm_lib.answer_loss(changed, seq)[0]) - float(loss)) > 1e-3


def test_sequence_puts_padding_first_and_keys_on_prompt_tokens():
  """Two samples: with image (3 patches) and without; text = 2 prompt slots (1 padding) + 2 answer slots."""
  lm = llama.init(llama.LlamaConfig(vocab_size=20, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, bos_token_id=1))
  vision = modeling.VisionTransformer(config.preset("tiny").vision, dtype=np.float32, rngs=nnx.Rngs(0))
  model = mllm_lib.MLLM(vision, lm, "linear", rngs=nnx.Rngs(0))
  batch = mllm_lib.Batch(features=np.ones((2, 3, 32), np.float32), image_present=np.array([True, False]),
                         input_ids=np.array([[0, 7, 8, 2]] * 2), text_valid=np.array([[False, True, True, True]] * 2),
                         prompt=np.array([[False, True, False, False]] * 2),
                         answer=np.array([[False, False, True, True]] * 2))
  seq = model.sequence(batch)
  np.testing.assert_array_equal(seq.valid, [[0, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1]])
  np.testing.assert_array_equal(seq.ids[:, -4:], [[0, 7, 8, 2], [1, 7, 8, 2]])
  np.testing.assert_array_equal(seq.ids[0, :5], [0, 1, 0, 0, 0])  # padding, <s>, three image rows
  np.testing.assert_array_equal(seq.call.modality[0], [0, 0, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(seq.call.key_mask, [[0, 0, 0, 0, 0, 1, 0, 0]] * 2)
  np.testing.assert_array_equal(seq.answer, [[0, 0, 0, 0, 0, 0, 1, 1]] * 2)


def test_projector_kinds():
  for kind, layers in (("linear", 1), ("mlp2x_gelu", 2)):
    projector = mllm_lib.Projector(kind, 8, 16, rngs=nnx.Rngs(0))
    assert len(projector.kernels) == layers and projector(np.ones((2, 3, 8))).shape == (2, 3, 16)
  with pytest.raises(ValueError, match="projector='conv'"):
    mllm_lib.Projector("conv", 8, 16, rngs=nnx.Rngs(0))


def test_image_tokens_are_the_penultimate_patches_and_optionally_the_last_class_token():
  lm = llama.init(llama.LlamaConfig(vocab_size=20, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, bos_token_id=1))
  vision_config = config.preset("tiny").vision
  vision = modeling.VisionTransformer(vision_config, dtype=np.float32, rngs=nnx.Rngs(0))
  pixels = np.random.default_rng(0).normal(size=(2, 3, vision_config.image_size, vision_config.image_size))
  hidden = vision(pixels.astype(np.float32)).hidden_states
  patches = mllm_lib.MLLM(vision, lm, "linear", "patches", rngs=nnx.Rngs(0)).image_features(pixels)
  both = mllm_lib.MLLM(vision, lm, "linear", "patches+class", rngs=nnx.Rngs(0)).image_features(pixels)
  np.testing.assert_array_equal(patches, hidden[-2][:, 1:])
  np.testing.assert_array_equal(both[:, :-1], patches)
  np.testing.assert_array_equal(both[:, -1], hidden[-1][:, 0])
  assert not np.allclose(hidden[-1][:, 0], hidden[-2][:, 0])
  with pytest.raises(ValueError, match="image_tokens='cls'"):
    mllm_lib.MLLM(vision, lm, "linear", "cls", rngs=nnx.Rngs(0))
