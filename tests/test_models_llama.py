"""The Llama-family decoder against transformers' PyTorch LlamaForCausalLM / Qwen2ForCausalLM on tiny random
configs, its KV cache against full recomputation, and the Hugging Face round trip.

Tolerance: logits within 1e-4 (float32 both sides, eager attention, float32 matmuls from conftest); the
measured gap is ~1e-7, so 1e-4 is loose enough for other CPUs and tight enough to catch any wrong rotary
phase, norm or bias (each moves logits by > 1e-2 at initializer_range 0.2).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mora_jax.models import hf, llama, llama_hf  # noqa: E402

TOLERANCE = 1e-4
# initializer_range 0.2 (not HF's 0.02): a random LM with tiny weights repeats one token, which would make the
# greedy comparison trivial.
TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0, initializer_range=0.2,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
CASES = [("llama", False), ("llama", True), ("qwen2", False), ("qwen2", True)]


def torch_model(kind: str, tie: bool, **overrides):
  cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
         "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]
  torch.manual_seed(0)
  model = cls[1](cls[0](**{**TINY, "tie_word_embeddings": tie, **overrides}, attn_implementation="eager")).eval()
  with torch.no_grad():  # non-zero biases, so that a dropped or misplaced bias shows
    for name, param in model.named_parameters():
      if name.endswith("bias"):
        param.normal_(0.0, 0.5)
  return model


@pytest.fixture(scope="module", params=CASES, ids=[f"{k}-{'tied' if t else 'untied'}" for k, t in CASES])
def pair(request, tmp_path_factory):
  kind, tie = request.param
  model = torch_model(kind, tie)
  directory = tmp_path_factory.mktemp(f"{kind}{tie}")
  model.save_pretrained(directory)
  return model, llama_hf.from_pretrained(directory), directory


def prompts():
  """Two prompts of 9 tokens, the second left-padded by 3 (as batched generation pads)."""
  ids = np.random.RandomState(0).randint(3, TINY["vocab_size"], (2, 9))
  mask = np.ones((2, 9), np.int64)
  mask[1, :3] = 0
  return ids, mask


def test_logits_match_transformers(pair):
  model, ours, _ = pair
  ids, mask = prompts()
  with torch.no_grad():
    expected = model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  got, _ = ours(ids, mask)
  valid = mask.astype(bool)  # transformers' logits at padding positions are not meaningful
  np.testing.assert_allclose(np.asarray(got)[valid], expected[valid], atol=TOLERANCE, rtol=0)


def test_greedy_generation_matches_transformers(pair):
  model, ours, _ = pair
  ids, mask = prompts()
  with torch.no_grad():
    expected = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=8,
                              do_sample=False)[:, ids.shape[1]:].numpy()
  got = llama.generate(ours, ids, mask, max_new_tokens=8, eos_token_id=TINY["eos_token_id"],
                       pad_token_id=TINY["pad_token_id"])
  assert len(set(expected.ravel().tolist())) > 2, "degenerate reference: the comparison would prove little"
  np.testing.assert_array_equal(np.asarray(got), expected)


def test_cached_decoding_equals_full_recomputation(pair):
  """Prefill 5 tokens, then 4 single-token steps: each step's logits equal the uncached pass's at that token."""
  _, ours, _ = pair
  ids, mask = prompts()
  full, _ = ours(ids, mask)
  cache = llama.init_cache(ours.config, 2, 9)
  logits, cache = ours(ids[:, :5], mask[:, :5], cache=cache)
  steps = [logits]
  for t in range(5, 9):
    logits, cache = ours(ids[:, t:t + 1], mask[:, t:t + 1], cache=cache)
    steps.append(logits)
  np.testing.assert_allclose(np.concatenate(steps, 1)[mask.astype(bool)], np.asarray(full)[mask.astype(bool)],
                             atol=1e-5, rtol=0)


def test_sampling_is_reproducible_and_follows_temperature(pair):
  _, ours, _ = pair
  ids, mask = prompts()
  key = jax.random.key(3)
  sample = lambda t, k: np.asarray(llama.generate(ours, ids, mask, max_new_tokens=6, temperature=t, key=k))
  np.testing.assert_array_equal(sample(1.0, key), sample(1.0, key))
  # A vanishing temperature puts all mass on the arg max: sampling becomes greedy decoding.
  np.testing.assert_array_equal(sample(1e-4, key), np.asarray(llama.generate(ours, ids, mask, max_new_tokens=6)))
  assert not np.array_equal(sample(50.0, key), sample(50.0, jax.random.key(4)))


def test_save_pretrained_round_trip_loads_in_transformers(pair, tmp_path):
  model, ours, source = pair
  llama_hf.save_pretrained(ours, tmp_path)
  reloaded = type(model).from_pretrained(tmp_path, attn_implementation="eager").eval()
  ids, mask = prompts()
  with torch.no_grad():
    theirs = reloaded(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  got, _ = ours(ids, mask)
  valid = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(got)[valid], theirs[valid], atol=TOLERANCE, rtol=0)
  again = dict(nnx.to_flat_state(nnx.state(llama_hf.from_pretrained(tmp_path), nnx.Param)))
  for path, variable in nnx.to_flat_state(nnx.state(ours, nnx.Param)):
    np.testing.assert_array_equal(again[path].get_value(), variable.get_value(), err_msg=str(path))
  assert json.loads((tmp_path / "config.json").read_text())["model_type"] == ours.config.model_type
  assert set(safetensors.numpy.load_file(tmp_path / "model.safetensors")) == (
      set(safetensors.numpy.load_file(source / "model.safetensors")) - ({"lm_head.weight"}
                                                                         if ours.config.tie_word_embeddings else set()))


def test_loading_is_strict_and_names_keys(tmp_path):
  model = torch_model("llama", False)
  model.save_pretrained(tmp_path)
  tensors = safetensors.numpy.load_file(tmp_path / "model.safetensors")
  tensors["model.layers.0.self_attn.extra.weight"] = np.zeros((2, 2), np.float32)
  del tensors["model.layers.1.mlp.up_proj.weight"]
  safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors")
  with pytest.raises(hf.WeightsError, match=r"missing keys: model\.layers\.1\.mlp\.up_proj\.weight.*"
                                            r"unused keys .*model\.layers\.0\.self_attn\.extra\.weight"):
    llama_hf.from_pretrained(tmp_path)


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
# config.json contents (over TINY, as transformers reads them) whose every field changes the logits: each must load
# with transformers' logits.
VARIANTS = {
    # Both keys: transformers takes rope_scaling whole (and, as it has no rope_theta, the top-level 500).
    "llama-rope_scaling-over-rope_parameters": ("llama", {
        "rope_parameters": {"rope_type": "default", "rope_theta": 50.0}, "rope_scaling": LLAMA3}),
    "llama-linear": ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 3.0, "rope_theta": 500.0}}),
    # max_position_embeddings 8 < the prompts' 9 tokens: the dynamic base rescales.
    "llama-dynamic": ("llama", {"max_position_embeddings": 8,
                                "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 500.0}}),
    # The top-level original_max_position_embeddings wins over the dict's.
    "llama-yarn": ("llama", {"original_max_position_embeddings": 16, "rope_parameters": {
        "rope_type": "yarn", "factor": 4.0, "rope_theta": 500.0, "original_max_position_embeddings": 32,
        "beta_fast": 8.0}}),
    # original length 4 < 9 tokens: the long factors.
    "llama-longrope": ("llama", {"rope_parameters": {
        "rope_type": "longrope", "rope_theta": 500.0, "original_max_position_embeddings": 4,
        "short_factor": [1.0, 1.5, 2.0, 2.5], "long_factor": [3.0, 5.0, 7.0, 9.0]}}),
    "llama-biases-head_dim": ("llama", {"mlp_bias": True, "attention_bias": True, "head_dim": 16}),
    "qwen2-mlp_bias-head_dim": ("qwen2", {"mlp_bias": True, "head_dim": 16}),  # Qwen2's MLP ignores mlp_bias
    # Sliding windows from layer max_window_layers 2 on: none of the 2 layers; legacy rope_scaling ("type") takes
    # the top-level rope_theta.
    "qwen2-full-layers-legacy-rope": ("qwen2", {
        "use_sliding_window": True, "max_window_layers": 2, "rope_theta": 300.0,
        "rope_scaling": {"type": "linear", "factor": 2.0}}),
}


def saved_variant(kind: str, fields: dict, directory):
  """transformers' model of config.json TINY + `fields`, and `directory` holding its weights and that config.json
  (written as given: save_pretrained would rewrite it in transformers' normal form)."""
  raw = {**TINY, "model_type": kind, **fields}
  (directory / "config.json").write_text(json.dumps(raw))
  config = transformers.AutoConfig.from_pretrained(directory, attn_implementation="eager")
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith("bias"):
        param.normal_(0.0, 0.5)
  model.save_pretrained(directory)
  (directory / "config.json").write_text(json.dumps(raw))
  return model


@pytest.mark.parametrize("name", VARIANTS)
def test_config_variants_load_with_transformers_logits(name, tmp_path):
  kind, fields = VARIANTS[name]
  model = saved_variant(kind, fields, tmp_path)
  ours = llama_hf.from_pretrained(tmp_path)
  ids, mask = prompts()
  with torch.no_grad():
    expected = model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  valid = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(ours(ids, mask)[0])[valid], expected[valid], atol=TOLERANCE, rtol=0)
  assert llama.LlamaConfig.from_hf_dict(ours.config.to_hf_dict()) == ours.config


# config.json fields (over TINY) that transformers accepts and this decoder does not compute: refused in one line
# that names the field.
REFUSED = {
    "rope-type": ({"rope_parameters": {"rope_type": "proportional", "rope_theta": 10.0}},
                  r"rope_parameters rope_type='proportional' is not implemented"),
    "partial-rotary": ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}},
                       r"partial_rotary_factor=0.5: partial rotary embeddings are not implemented"),
    "llama3-key": ({"rope_scaling": {k: v for k, v in LLAMA3.items() if k != "low_freq_factor"}},
                   r"rope_scaling of rope_type 'llama3' lacks low_freq_factor"),
    "longrope-length": ({"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}},
                        r"short_factor has 1 values; longrope needs one per rotated pair, head_dim // 2 = 4"),
    "per-layer-rope": ({"model_type": "qwen2", "rope_parameters": {"full_attention": {"rope_type": "default"}}},
                       r"rope_parameters .* is per layer type"),
    "sliding-layers": ({"model_type": "qwen2", "use_sliding_window": True, "max_window_layers": 1},
                       r"use_sliding_window / layer_types: .*'sliding_attention'"),
    "sliding-layer-types": ({"model_type": "qwen2", "layer_types": ["full_attention", "sliding_attention"]},
                            r"use_sliding_window / layer_types: .*'sliding_attention'"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_unsupported_configs_are_refused_naming_the_field(name, tmp_path):
  fields, message = REFUSED[name]
  (tmp_path / "config.json").write_text(json.dumps({**TINY, **fields}))
  with pytest.raises(hf.WeightsError, match="config.json.*" + message) as refused:
    llama_hf.read_config(tmp_path)
  assert "\n" not in str(refused.value)


def test_inconsistent_configs_are_refused():
  with pytest.raises(ValueError, match="num_key_value_heads"):
    llama.LlamaConfig(**{**TINY, "num_key_value_heads": 3})
  with pytest.raises(ValueError, match="mlp_bias and attention_bias are Llama settings"):
    llama.LlamaConfig(**TINY, model_type="qwen2", mlp_bias=True)


def test_logical_axes_cover_every_weight():
  model = llama.init(llama.LlamaConfig(**TINY, model_type="qwen2"))
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = variable.get_metadata().get("logical_axes")
    assert axes is not None and len(axes) == jnp.ndim(variable.get_value()), path
