"""Checkpoint I/O without torch: bad inputs, Hub-cache resolution, bf16 storage, presets."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from mora_jax import backbones, clip
from tests import helpers


@pytest.fixture(name="checkpoint")
def fixture_checkpoint(tmp_path):
  """A tiny random CLIP saved in Hugging Face format, and its tensors."""
  model = clip.init(helpers.tiny_config(), seed=1)
  path = clip.save_pretrained(model, tmp_path / "ckpt")
  return path, safetensors.numpy.load_file(path / "model.safetensors")


def rewrite(path, tensors):
  safetensors.numpy.save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_saved_checkpoint_is_hugging_face_layout(checkpoint):
  path, tensors = checkpoint
  assert tensors["vision_model.embeddings.patch_embedding.weight"].shape == (32, 3, 8, 8)  # OIHW
  assert tensors["text_model.encoder.layers.0.mlp.fc1.weight"].shape == (64, 32)  # [out, in]
  assert tensors["logit_scale"].shape == ()
  assert len(tensors) == 78  # as transformers' own tiny CLIPModel state dict
  config = json.loads((path / "config.json").read_text())
  assert config["model_type"] == "clip" and config["text_config"]["eos_token_id"] == 127


def test_load_then_save_is_lossless(checkpoint, tmp_path):
  path, tensors = checkpoint
  again = safetensors.numpy.load_file(clip.save_pretrained(clip.from_pretrained(path), tmp_path / "b")
                                      / "model.safetensors")
  assert again.keys() == tensors.keys()
  for key, value in tensors.items():
    np.testing.assert_array_equal(again[key], value, err_msg=key)


def test_a_bfloat16_checkpoint_is_saved_again_in_bfloat16(checkpoint, tmp_path):
  path, tensors = checkpoint
  rewrite(path, {k: v.astype("bfloat16") for k, v in tensors.items()})
  on_disk = safetensors.numpy.load_file(path / "model.safetensors")
  assert backbones.storage_dtype(on_disk) == "bfloat16" and backbones.storage_dtype(tensors) == "float32"
  again = safetensors.numpy.load_file(clip.save_pretrained(clip.from_pretrained(path), tmp_path / "b", "bfloat16")
                                      / "model.safetensors")
  for key, value in on_disk.items():
    assert again[key].dtype == value.dtype, key
    np.testing.assert_array_equal(again[key], value, err_msg=key)


def test_directory_without_weights(checkpoint):
  path, _ = checkpoint
  (path / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match=f"{path}.*holds no weights.*model.safetensors"):
    clip.from_pretrained(path)


def test_directory_without_config(checkpoint):
  path, _ = checkpoint
  (path / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match="config.json not found"):
    clip.from_pretrained(path)


def test_missing_local_path():
  with pytest.raises(FileNotFoundError, match="/no/such/dir is not a checkpoint directory"):
    clip.from_pretrained("/no/such/dir")


def test_renamed_key_names_both_keys(checkpoint):
  path, tensors = checkpoint
  tensors["text_model.final_layernorm.weight"] = tensors.pop("text_model.final_layer_norm.weight")
  rewrite(path, tensors)
  with pytest.raises(clip.WeightsError) as info:
    clip.from_pretrained(path)
  message = str(info.value)
  assert "model.safetensors" in message
  assert "missing keys: text_model.final_layer_norm.weight" in message
  assert "unused keys (not part of this CLIP config): text_model.final_layernorm.weight" in message


def test_wrong_shape_names_key_and_shapes(checkpoint):
  path, tensors = checkpoint
  tensors["vision_model.encoder.layers.1.self_attn.v_proj.weight"] = np.zeros((32, 31), np.float32)
  rewrite(path, tensors)
  with pytest.raises(clip.WeightsError,
                     match=r"v_proj.weight: checkpoint \(32, 31\), model expects \(32, 32\)"):
    clip.from_pretrained(path)


def test_old_position_ids_buffers_are_skipped(checkpoint):
  path, tensors = checkpoint
  tensors["text_model.embeddings.position_ids"] = np.arange(16)[None]
  rewrite(path, tensors)
  clip.from_pretrained(path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_names_file(checkpoint, damage):
  path, _ = checkpoint
  file = path / "model.safetensors"
  data = file.read_bytes()
  file.write_bytes(data[:len(data) // 2] if damage == "truncate" else b"not a safetensors file at all")
  with pytest.raises(clip.WeightsError, match=f"{file} is not a readable safetensors file"):
    clip.from_pretrained(path)


def test_pytorch_bin_without_torch_is_a_clear_error(checkpoint, monkeypatch):
  path, _ = checkpoint
  (path / "model.safetensors").rename(path / "pytorch_model.bin")
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
  with pytest.raises(clip.WeightsError, match="pytorch_model.bin is a PyTorch pickle.*needs torch"):
    clip.from_pretrained(path)


def test_sharded_safetensors_index(checkpoint):
  path, tensors = checkpoint
  keys = sorted(tensors)
  halves = {"model-00001-of-00002.safetensors": keys[:40], "model-00002-of-00002.safetensors": keys[40:]}
  for name, part in halves.items():
    safetensors.numpy.save_file({k: tensors[k] for k in part}, path / name, metadata={"format": "pt"})
  (path / "model.safetensors").unlink()
  (path / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {k: name for name, part in halves.items() for k in part}}))
  loaded = clip.from_pretrained(path)
  np.testing.assert_array_equal(np.asarray(loaded.logit_scale[...]), tensors["logit_scale"])


def test_unsupported_activation_is_rejected(checkpoint):
  path, _ = checkpoint
  config = json.loads((path / "config.json").read_text())
  config["text_config"]["hidden_act"] = "swish"
  (path / "config.json").write_text(json.dumps(config))
  with pytest.raises(clip.WeightsError, match="hidden_act='swish' is not supported"):
    clip.from_pretrained(path)


def test_hub_id_resolves_through_the_cache(checkpoint, tmp_path):
  """A Hub id loads from a populated Hugging Face cache with the network off; an uncached id fails clearly."""
  path, _ = checkpoint
  commit = "0123456789abcdef0123456789abcdef01234567"
  repo = tmp_path / "hub" / "models--openai--clip-tiny"
  snapshot = repo / "snapshots" / commit
  snapshot.mkdir(parents=True)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text(commit)
  for name in ("config.json", "model.safetensors"):
    (snapshot / name).write_bytes((path / name).read_bytes())
  script = textwrap.dedent("""
      from mora_jax import backbones, clip
      model = clip.from_pretrained("openai/clip-tiny")
      print("loaded", model.config.projection_dim)
      try:
        clip.from_pretrained("openai/not-cached")
      except FileNotFoundError as e:
        print("error", e)
  """)
  env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True,
                       cwd=os.path.dirname(os.path.dirname(__file__))).stdout
  assert "loaded 16" in out
  assert "error 'openai/not-cached' is not a local directory and could not be fetched" in out


def test_bf16_weights_halve_memory_and_keep_features(checkpoint):
  path, _ = checkpoint
  f32 = clip.from_pretrained(path)
  bf16 = clip.from_pretrained(path, dtype=jnp.bfloat16)
  assert bf16.text_model.encoder.layers[0].self_attn.q_proj.kernel[...].dtype == jnp.bfloat16
  assert bf16.text_model.final_layer_norm.scale[...].dtype == jnp.float32  # LayerNorm stays float32
  nbytes = lambda m: sum(v.nbytes for v in jax.tree.leaves(nnx.state(m)))
  assert nbytes(bf16) < 0.52 * nbytes(f32)
  pixels, ids, mask = helpers.random_inputs(f32.config)
  for get in (lambda m: m.get_image_features(pixels), lambda m: m.get_text_features(ids, mask)):
    reference, low = np.asarray(get(f32)), np.asarray(get(bf16))
    assert low.dtype == np.float32
    assert np.linalg.norm(low - reference) / np.linalg.norm(reference) <= 2e-2


def test_presets_match_published_sizes():
  counts = {name: clip.count_params(nnx.eval_shape(lambda c=cfg: clip.init(c))) for name, cfg in clip.PRESETS.items()}
  # ViT-B/16's 149,620,737 is the figure the MoRA authors report; the others are the released checkpoints'.
  assert counts["ViT-B/16"] == 149_620_737
  assert counts["ViT-B/32"] == 151_277_313
  assert counts["ViT-L/14"] == 427_616_513
  assert counts["ViT-L/14-336"] == 427_944_193  # 24*24 - 16*16 = 320 more positions of width 1024


def test_wrong_image_size_is_rejected():
  model = clip.init(helpers.tiny_config())
  with pytest.raises(ValueError, match=r"expects \[B, 3, 32, 32\] \(NCHW"):
    model.get_image_features(np.zeros((1, 32, 32, 3), np.float32))
