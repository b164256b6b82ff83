"""Parity of our Flax CLIP with Hugging Face's PyTorch CLIPModel (random weights, float32, eager attention).

Tolerances: float32 rounds at ~6e-8 relative, and the two frameworks order their sums differently. Measured
on this machine (2-core x86 CPU; `pytest -s` prints them): tiny features and hidden states differ by
<= 8.4e-7, ViT-B/16 features (magnitude ~3.5) by <= 3.1e-6. The bounds (1e-4 tiny, 2e-4 ViT-B/16) leave room for other BLAS builds and thread counts while
still catching any real difference: a wrong mask, activation, eps or pooling index moves features by > 1e-2.
"""

import dataclasses

import numpy as np
import pytest

from mora_jax import clip
from tests import helpers

torch = pytest.importorskip("torch", reason="parity tests need torch (not installed on the Python 3.12 leg)")
transformers = pytest.importorskip("transformers")


def torch_clip(cfg: clip.CLIPConfig, seed: int = 0):
  torch.manual_seed(seed)
  hf_cfg = transformers.CLIPConfig(**cfg.to_hf_dict())
  model = transformers.CLIPModel._from_config(hf_cfg, attn_implementation="eager")  # pylint: disable=protected-access
  assert model.config._attn_implementation == "eager"  # pylint: disable=protected-access
  return model.eval().to(torch.float32)


def save_torch(model, path) -> str:
  model.save_pretrained(path)
  return str(path)


def hf_outputs(model, pixels, ids, mask):
  with torch.no_grad():
    px, ids_t, mask_t = torch.tensor(pixels), torch.tensor(ids), torch.tensor(mask)
    vision = model.vision_model(pixel_values=px, output_hidden_states=True)
    text = model.text_model(input_ids=ids_t, attention_mask=mask_t, output_hidden_states=True)
    return dict(
        image=model.get_image_features(pixel_values=px).pooler_output.numpy(),
        text=model.get_text_features(input_ids=ids_t, attention_mask=mask_t).pooler_output.numpy(),
        vision_hidden=[h.numpy() for h in vision.hidden_states],
        text_hidden=[h.numpy() for h in text.hidden_states],
        text_pooled=text.pooler_output.numpy())


def max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


@pytest.mark.parametrize("cfg", [
    helpers.tiny_config(),  # eos 127: first-EOS branch, which here is also the largest id
    helpers.tiny_config(eos_token_id=100),  # first-EOS branch where argmax of ids would pick another token
    helpers.tiny_config(eos_token_id=2),  # old-config branch: pool at the largest id
    dataclasses.replace(helpers.tiny_config(), vision=dataclasses.replace(
        clip.preset("tiny").vision, hidden_act="gelu")),
], ids=["eos127", "eos100", "eos2-argmax", "gelu-vision"])
def test_tiny_parity_features_and_hidden_states(cfg, tmp_path):
  if cfg.vision.hidden_act == "gelu":
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, hidden_act="gelu"))
  model = torch_clip(cfg)
  ours = clip.from_pretrained(save_torch(model, tmp_path))
  pixels, ids, mask = helpers.random_inputs(cfg)
  ref = hf_outputs(model, pixels, ids, mask)

  vision = ours.vision_model(pixels)
  text = ours.text_model(ids, mask)
  assert len(vision.hidden_states) == len(ref["vision_hidden"]) == cfg.vision.num_hidden_layers + 1
  assert len(text.hidden_states) == len(ref["text_hidden"]) == cfg.text.num_hidden_layers + 1
  for i, (a, b) in enumerate(zip(vision.hidden_states, ref["vision_hidden"])):
    assert max_diff(a, b) <= 1e-4, f"vision hidden state {i}"
  for i, (a, b) in enumerate(zip(text.hidden_states, ref["text_hidden"])):
    assert max_diff(a, b) <= 1e-4, f"text hidden state {i}"
  assert max_diff(text.pooler_output, ref["text_pooled"]) <= 1e-4
  image_fn, text_fn = helpers.jit_features(ours)
  image_diff, text_diff = max_diff(image_fn(pixels), ref["image"]), max_diff(text_fn(ids, mask), ref["text"])
  hidden_diff = max(max_diff(a, b) for a, b in zip(vision.hidden_states + text.hidden_states,
                                                     ref["vision_hidden"] + ref["text_hidden"]))
  print(f"tiny max abs diff: image {image_diff:.2e}, text {text_diff:.2e}, hidden states {hidden_diff:.2e}")
  assert image_diff <= 1e-4
  assert text_diff <= 1e-4
  # Eager (un-jitted) calls compute the same thing.
  assert max_diff(ours.get_text_features(ids, mask), ref["text"]) <= 1e-4


def test_eos_branches_pool_different_tokens():
  """Guards the test above: with eos_token_id=100 the two pooling rules really disagree on these inputs."""
  cfg = helpers.tiny_config(eos_token_id=100)
  _, ids, _ = helpers.random_inputs(cfg)
  first_eos = (ids == 100).argmax(-1)
  assert np.any(first_eos != ids.argmax(-1))


def test_vit_b16_parity(tmp_path):
  cfg = clip.preset("ViT-B/16")
  model = torch_clip(cfg)
  ours = clip.from_pretrained(save_torch(model, tmp_path))
  pixels, ids, mask = helpers.random_inputs(cfg, batch=2, length=77)
  ref = hf_outputs(model, pixels, ids, mask)
  image_fn, text_fn = helpers.jit_features(ours)
  image_diff, text_diff = max_diff(image_fn(pixels), ref["image"]), max_diff(text_fn(ids, mask), ref["text"])
  print(f"ViT-B/16 max abs diff: image {image_diff:.2e}, text {text_diff:.2e}")
  assert image_diff <= 2e-4
  assert text_diff <= 2e-4


def test_save_pretrained_round_trip_through_transformers(tmp_path):
  cfg = helpers.tiny_config()
  ours = clip.init(cfg, seed=3)
  exported = clip.save_pretrained(ours, tmp_path / "export")
  reloaded = transformers.CLIPModel.from_pretrained(exported, attn_implementation="eager").eval()
  pixels, ids, mask = helpers.random_inputs(cfg)
  ref = hf_outputs(reloaded, pixels, ids, mask)
  image_fn, text_fn = helpers.jit_features(ours)
  assert max_diff(image_fn(pixels), ref["image"]) <= 1e-4
  assert max_diff(text_fn(ids, mask), ref["text"]) <= 1e-4
  assert float(reloaded.logit_scale.detach()) == pytest.approx(float(ours.logit_scale[...]))


def test_pytorch_bin_checkpoint_loads(tmp_path):
  cfg = helpers.tiny_config()
  model = torch_clip(cfg)
  (tmp_path / "config.json").write_text(model.config.to_json_string())
  torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
  ours = clip.from_pretrained(tmp_path)
  pixels, ids, mask = helpers.random_inputs(cfg)
  assert max_diff(ours.get_image_features(pixels), hf_outputs(model, pixels, ids, mask)["image"]) <= 1e-4


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_towers_entered_at_a_layer_give_the_full_pass(layer):
  """hidden_at(k) then from_layer(k) is the full forward split in two jitted calls (the prefix cache's path):
  the same operations, so equal up to XLA fusing them differently (measured <= 3e-7; bound 1e-6)."""
  import jax  # pylint: disable=import-outside-toplevel
  cfg = helpers.tiny_config()
  model = clip.init(cfg, seed=3)
  pixels, ids, mask = helpers.random_inputs(cfg, batch=3, length=cfg.text.max_position_embeddings)
  image, text = helpers.jit_features(model)
  vision_hidden = jax.jit(lambda p: model.vision_model.hidden_at(p, layer))(pixels)
  text_hidden = jax.jit(lambda i, m: model.text_model.hidden_at(i, m, layer))(ids, mask)
  pool = model.text_model.eos_positions(ids)
  image_from = jax.jit(lambda h: model.image_features_from(h, layer))(vision_hidden)
  text_from = jax.jit(lambda h, m: model.text_features_from(h, layer, pool, m))(text_hidden, mask)
  np.testing.assert_allclose(image_from, image(pixels), atol=1e-6, rtol=0)
  np.testing.assert_allclose(text_from, text(ids, mask), atol=1e-6, rtol=0)
  assert vision_hidden.shape == (3, cfg.vision.num_patches + 1, cfg.vision.hidden_size)


def test_zero_length_prompts_leave_each_tower_bitwise_unchanged():
  """A prompting method with no tokens computes exactly plain CLIP (same values, bit for bit), jitted."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  cfg = helpers.tiny_config()
  graphdef, state = nnx.split(clip.init(cfg))
  pixels, ids, mask = helpers.random_inputs(cfg, batch=3, length=12)
  none = lambda x: [x[:, :0]] * cfg.vision.num_hidden_layers  # every layer prompted, with 0 tokens

  def towers(state, prompts):
    model = nnx.merge(graphdef, state)
    vision = model.vision_model(pixels, prompts=prompts)
    text = model.text_model(ids, mask, prompts=prompts)
    return vision, text, model.get_image_features(pixels, prompts=prompts), model.get_text_features(
        ids, mask, prompts=prompts)

  plain = jax.jit(lambda state: towers(state, None))(state)
  prompted = jax.jit(lambda state: towers(state, none))(state)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(prompted), strict=True):
    assert a.shape == b.shape and np.array_equal(np.asarray(a), np.asarray(b))
