"""MokA's layer against a loop-by-loop transcription of docs/method.md (outputs and autograd gradients).

Tolerances: the layer runs in float32 with exact float32 matmuls (conftest) and the reference in float64, so
1e-5 bounds float32 rounding on these O(1) values; anything structurally wrong is off by far more.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mora_jax.adapters import moka, partition
from mora_jax.adapters.lora import LoRAConfig, LoRALinear
from mora_jax.models.modeling import Linear
from mora_jax.train import recipes

BATCH, LENGTH, D_IN, D_OUT, RANK, MODALITIES = 3, 10, 8, 6, 4, 3
N_NONTEXT = 4  # fixed layout: rows [:4] non-text, rows [4:] text
TOL = dict(atol=1e-5, rtol=1e-5)
# The text entry (id 0) is large on purpose: it must never be read, text rows are not queries.
LAMBDAS = (9.0, 0.6, 1.5)


def config(**overrides) -> moka.MokAConfig:
  return moka.MokAConfig(**{"rank": RANK, "dropout": 0.0, "lambdas": LAMBDAS, **overrides})


def layer(cfg: moka.MokAConfig | None = None, num_modalities: int = MODALITIES, perturb: bool = True,
          seed: int = 0) -> moka.MokALinear:
  """A MokA linear on a random frozen Linear (non-zero bias), with B moved off zero unless `perturb` is False."""
  rng = np.random.RandomState(seed)
  base = Linear(D_IN, D_OUT, axes=("embed", "mlp"), std=0.5, rngs=nnx.Rngs(seed))
  base.bias.set_value(jnp.asarray(rng.randn(D_OUT).astype(np.float32)))
  module = moka.MokALinear(base, num_modalities, cfg or config(), variable_type=partition.TextSpecific,
                           rngs=nnx.Rngs(seed + 1))
  if perturb:
    module.lora_B.set_value(jnp.asarray(0.3 * rng.randn(RANK, D_OUT).astype(np.float32)))
  return module


def random_inputs(seed: int = 0, fixed_layout: bool = False):
  """x, modality ids (text = 0), key mask, padding, and a cotangent for the loss sum(y * cotangent)."""
  rng = np.random.RandomState(seed)
  x = rng.randn(BATCH, LENGTH, D_IN).astype(np.float32)
  if fixed_layout:
    modality = np.concatenate([rng.randint(1, MODALITIES, (BATCH, N_NONTEXT)),
                               np.zeros((BATCH, LENGTH - N_NONTEXT), np.int64)], 1)
  else:
    modality = rng.randint(0, MODALITIES, (BATCH, LENGTH))
  key_mask = rng.rand(BATCH, LENGTH) < 0.7
  padding = rng.rand(BATCH, LENGTH) < 0.2
  keys = (modality == 0) & key_mask & ~padding
  queries = (modality != 0) & ~padding
  assert keys.any(1).all() and queries.any(1).all() and (keys.sum(1) > 1).any()  # every term matters
  cotangent = rng.randn(BATCH, LENGTH, D_OUT).astype(np.float32)
  return x, modality, key_mask, padding, cotangent


def outputs_and_grads(module: moka.MokALinear, x, modality, key_mask, padding, cotangent, **call_kwargs):
  """y and the gradients of sum(y * cotangent) w.r.t. A, B and x. Eager: its primitives compile once for the
  whole file, where a jit would compile once per config."""
  graphdef, params, rest = nnx.split(module, partition.Trainable, ...)

  def loss(params, x):
    y = nnx.merge(graphdef, params, rest)(x, modality, key_mask, padding, **call_kwargs)
    return jnp.sum(y * cotangent), y

  (_, y), (grads, grad_x) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
  return tuple(np.asarray(v) for v in (y, grads["lora_A"][...], grads["lora_B"][...], grad_x))


def reference(module: moka.MokALinear, x, modality, key_mask, padding, cotangent, text: int = 0):
  """docs/method.md row by row, in float64 torch: (y, dA, dB, dx) with the gradients of sum(y * cotangent)."""
  torch = pytest.importorskip("torch", reason="the loop reference takes its gradients from torch autograd")
  cfg = module.cfg
  as_torch = lambda v: torch.tensor(np.asarray(v), dtype=torch.float64)
  a, b, xs = (as_torch(v).requires_grad_() for v in (module.lora_A[...], module.lora_B[...], x))
  kernel, bias = as_torch(module.base.kernel[...]), as_torch(module.base.bias[...])
  lambdas = cfg.modality_lambdas(a.shape[0])
  scale = cfg.alpha / cfg.rank
  before = cfg.scale_placement == "before_attention"
  rows = []
  for s in range(x.shape[0]):
    z = {i: xs[s, i] @ a[modality[s, i]] * (scale if before else 1.0)
         for i in range(x.shape[1]) if not padding[s, i]}
    keys = [j for j in z if modality[s, j] == text and key_mask[s, j]]
    tau = math.sqrt(cfg.rank) if cfg.temperature == "sqrt_rank" else math.sqrt(max(len(keys), 1))
    for i in range(x.shape[1]):
      y = xs[s, i] @ kernel + bias
      if not padding[s, i]:
        z_i = z[i]
        if modality[s, i] != text and keys:
          weights = torch.softmax(torch.stack([z[i] @ z[j] / tau for j in keys]), 0)
          z_i = z_i + lambdas[modality[s, i]] * sum(w * z[j] for w, j in zip(weights, keys, strict=True))
        y = y + (z_i @ b) * (1.0 if before else scale)
      rows.append(y)
  y = torch.stack(rows).reshape(*x.shape[:2], -1)
  (y * as_torch(cotangent)).sum().backward()
  return tuple(v.detach().numpy() for v in (y, a.grad, b.grad, xs.grad))


def assert_all_close(actual, expected):
  for name, got, want in zip(("y", "dA", "dB", "dx"), actual, expected, strict=True):
    np.testing.assert_allclose(got, want, **TOL, err_msg=name)


@pytest.mark.parametrize("scale_placement", moka.SCALE_PLACEMENTS)
@pytest.mark.parametrize("temperature", moka.TEMPERATURES)
def test_general_path_outputs_and_gradients_equal_the_loop_reference(temperature, scale_placement):
  module = layer(config(temperature=temperature, scale_placement=scale_placement))
  inputs = random_inputs()
  expected = reference(module, *inputs)
  assert_all_close(outputs_and_grads(module, *inputs), expected)
  assert np.abs(expected[1]).min(axis=(1, 2)).max() > 0  # every modality's A gets a gradient


def test_scalar_lam_is_lambda_of_every_modality():
  module = layer(config(lambdas=(), lam=0.8))
  assert module.lambdas == (0.8,) * MODALITIES
  inputs = random_inputs(seed=1)
  assert_all_close(outputs_and_grads(module, *inputs), reference(module, *inputs))


def test_lambda_zero_is_per_modality_a_with_shared_b_and_delta_folds_it():
  module = layer(config(lambdas=(0.0,) * MODALITIES))
  x, modality, key_mask, padding, _ = random_inputs()
  kernel, bias = np.asarray(module.base.kernel[...], np.float64), np.asarray(module.base.bias[...], np.float64)
  a, b = np.asarray(module.lora_A[...], np.float64), np.asarray(module.lora_B[...], np.float64)
  per_row_a = a[modality]  # [B, L, in, r]
  update = module.cfg.scale * np.einsum("bli,blir->blr", x, per_row_a) @ b
  expected = x @ kernel + bias + np.where(padding[..., None], 0.0, update)
  y = np.asarray(module(x, modality, key_mask, padding))
  np.testing.assert_allclose(y, expected, **TOL)
  folded = np.stack([x @ (kernel + np.asarray(module.delta(m))) + bias for m in range(MODALITIES)])  # [M, B, L, out]
  from_delta = np.take_along_axis(folded, modality[None, ..., None], 0)[0]
  np.testing.assert_allclose(y[~padding], from_delta[~padding], **TOL)


def test_one_modality_is_plain_lora():
  module = layer(config(lambdas=(), lam=1.0), num_modalities=1)
  lora = LoRALinear(module.base, "text", LoRAConfig(rank=RANK, alpha=module.cfg.alpha, dropout=0.0),
                    rngs=nnx.Rngs(0))
  lora.lora_A.set_value(module.lora_A[0])
  lora.lora_B.set_value(module.lora_B[...])
  x = random_inputs()[0]
  modality = np.zeros((BATCH, LENGTH), np.int64)
  y = module(x, modality, np.ones((BATCH, LENGTH), bool))
  np.testing.assert_allclose(np.asarray(y), np.asarray(lora(x)), atol=1e-6, rtol=1e-6)


def test_init_is_exactly_the_frozen_linear():
  module = layer(perturb=False)
  a = np.asarray(module.lora_A[...])
  assert a.shape == (MODALITIES, D_IN, RANK) and np.abs(a).max() <= D_IN**-0.5
  assert not np.array_equal(a[0], a[1]) and not np.array_equal(a[1], a[2])  # independent keys per modality
  assert type(module.lora_A) is partition.TextSpecific and type(module.lora_B) is partition.TextSpecific
  x, modality, key_mask, padding, _ = random_inputs()
  frozen = np.asarray(module.base(x))
  np.testing.assert_array_equal(np.asarray(module(x, modality, key_mask, padding)), frozen)
  fixed = random_inputs(fixed_layout=True)
  np.testing.assert_array_equal(np.asarray(module(*fixed[:4], layout=N_NONTEXT)), np.asarray(module.base(fixed[0])))


@pytest.mark.parametrize("layout", [None, N_NONTEXT])
def test_text_rows_do_not_depend_on_non_text_rows(layout):
  module = layer()
  x, modality, key_mask, padding, cotangent = random_inputs(fixed_layout=layout is not None)
  text = modality == 0
  moved = np.where(text[..., None], x, x + np.random.RandomState(5).randn(*x.shape).astype(np.float32))
  y = np.asarray(module(x, modality, key_mask, padding, layout=layout))
  y_moved = np.asarray(module(moved, modality, key_mask, padding, layout=layout))
  np.testing.assert_array_equal(y_moved[text], y[text])
  assert np.abs(y_moved[~text & ~padding] - y[~text & ~padding]).min() > 0
  text_only = cotangent * text[..., None]
  grad_x = outputs_and_grads(module, x, modality, key_mask, padding, text_only, layout=layout)[3]
  assert np.all(grad_x[~text] == 0) and np.abs(grad_x[text]).max() > 0


def inputs_without_keys():
  """random_inputs where sample 0 has no text at all and sample 1 text that may not be keys."""
  x, modality, key_mask, padding, cotangent = random_inputs()
  modality[0] = np.where(modality[0] == 0, 1, modality[0])
  key_mask[1] = False
  return x, modality, key_mask, padding, cotangent


@pytest.mark.parametrize("temperature", moka.TEMPERATURES)
def test_sample_without_keys_gets_zero_cross_term_and_finite_gradients(temperature):
  inputs = inputs_without_keys()
  y, *grads = outputs_and_grads(layer(config(temperature=temperature)), *inputs)
  y_without_cross = np.asarray(layer(config(temperature=temperature, lambdas=(0.0,) * MODALITIES))(*inputs[:4]))
  assert all(np.isfinite(v).all() for v in (y, *grads))
  np.testing.assert_allclose(y[:2], y_without_cross[:2], atol=1e-6, rtol=0)
  assert np.abs(y[2] - y_without_cross[2]).max() > 1e-3  # sample 2 has keys: its cross term is not zero


@pytest.mark.parametrize("temperature", moka.TEMPERATURES)
def test_samples_without_keys_equal_the_loop_reference(temperature):
  module = layer(config(temperature=temperature))
  inputs = inputs_without_keys()
  assert_all_close(outputs_and_grads(module, *inputs), reference(module, *inputs))


def test_cross_attention_is_a_safe_masked_softmax():
  rng = np.random.RandomState(0)
  queries = 30.0 * rng.randn(BATCH, 5, RANK).astype(np.float32)  # large logits: the max shift must hold
  keys = rng.randn(BATCH, 7, RANK).astype(np.float32)
  key_mask = rng.rand(BATCH, 7) < 0.6
  key_mask[1] = False
  key_mask[2, :2], key_mask[2, 2:] = True, False
  keys[2, :2] = 1.0  # sample 2: every valid logit is about -800, far below exp's float32 range
  queries[2] = -200.0
  tau = np.array([2.0, 1.0, 1.0], np.float32)
  out = np.asarray(moka.cross_attention(queries, keys, key_mask, tau))
  np.testing.assert_array_equal(out[1], 0.0)
  for s in (0, 2):
    logits = queries[s].astype(np.float64) @ keys[s, key_mask[s]].T / tau[s]
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(out[s], weights / weights.sum(-1, keepdims=True) @ keys[s, key_mask[s]], **TOL)
  grads = jax.grad(lambda q, k: jnp.sum(jnp.sin(moka.cross_attention(q, k, key_mask, tau))), argnums=(0, 1))(
      queries, keys)
  for grad in grads:
    assert np.isfinite(np.asarray(grad)).all() and np.all(np.asarray(grad)[1] == 0)
  assert np.abs(np.asarray(grads[1])[0]).max() > 0


def test_text_a_learns_through_keys_and_values_alone():
  module = layer()
  x, modality, key_mask, padding, cotangent = random_inputs(seed=7)
  queries = (modality != 0) & ~padding
  query_only = cotangent * queries[..., None]  # text rows' outputs are not in the loss
  got = outputs_and_grads(module, x, modality, key_mask, padding, query_only)
  expected = reference(module, x, modality, key_mask, padding, query_only)
  assert np.abs(got[1][0]).max() > 1e-3
  assert_all_close(got, expected)


@pytest.mark.parametrize("scale_placement", moka.SCALE_PLACEMENTS)
@pytest.mark.parametrize("temperature", moka.TEMPERATURES)
def test_fixed_layout_equals_general_path(temperature, scale_placement):
  module = layer(config(temperature=temperature, scale_placement=scale_placement))
  inputs = random_inputs(seed=3, fixed_layout=True)
  general = outputs_and_grads(module, *inputs)
  fixed = outputs_and_grads(module, *inputs, layout=N_NONTEXT)
  for name, got, want in zip(("y", "dA", "dB", "dx"), fixed, general, strict=True):
    np.testing.assert_allclose(got, want, **TOL, err_msg=name)


def test_fixed_layout_update_is_queries_plus_lambda_attention():
  rng = np.random.RandomState(4)
  z_nontext, z_text = rng.randn(BATCH, 3, RANK), rng.randn(BATCH, 5, RANK)
  z = np.concatenate([z_nontext, z_text], 1).astype(np.float32)
  modality = np.array([[1, 2, 1, 0, 0, 0, 0, 0]] * BATCH)
  key_mask = rng.rand(BATCH, 8) < 0.7
  no_padding = np.zeros((BATCH, 8), bool)
  lambdas = np.array([0.0, 0.5, 2.0], np.float32)
  tau = moka.temperature("sqrt_num_keys", RANK, key_mask[:, 3:])
  general = moka.rank_space_update(z, modality, key_mask, no_padding, lambdas, tau)
  fixed = moka.fixed_layout_update(z[:, :3], z[:, 3:], key_mask[:, 3:], lambdas[modality[:, :3]][..., None], tau)
  np.testing.assert_allclose(np.asarray(fixed), np.asarray(general)[:, :3], atol=1e-6, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(general)[:, 3:], z[:, 3:])


def test_temperature_options():
  key_mask = np.array([[True, True, False, True], [False] * 4, [True, False, False, False]])
  np.testing.assert_allclose(np.asarray(moka.temperature(config().temperature, RANK, key_mask)), [2.0, 2.0, 2.0])
  np.testing.assert_allclose(np.asarray(moka.temperature("sqrt_num_keys", RANK, key_mask)), [3**0.5, 1.0, 1.0])
  with pytest.raises(ValueError, match="temperature='sqrt_dim'"):
    moka.temperature("sqrt_dim", RANK, key_mask)


def test_dropout_changes_the_output_only_with_rngs():
  module = layer(config(dropout=0.5))
  x, modality, key_mask, padding, _ = random_inputs()
  deterministic = np.asarray(module(x, modality, key_mask, padding))
  np.testing.assert_array_equal(np.asarray(module(x, modality, key_mask, padding)), deterministic)
  dropped = np.asarray(module(x, modality, key_mask, padding, rngs=nnx.Rngs(dropout=0)))
  again = np.asarray(module(x, modality, key_mask, padding, rngs=nnx.Rngs(dropout=0)))
  assert np.isfinite(dropped).all() and np.abs(dropped - deterministic).max() > 1e-3
  np.testing.assert_array_equal(dropped, again)
  np.testing.assert_array_equal(dropped[padding], deterministic[padding])  # padding rows: frozen output only


def test_defaults_are_the_moka_authors_and_reach_every_recipe():
  cfg = moka.MokAConfig()
  assert (cfg.rank, cfg.alpha, cfg.scale, cfg.dropout, cfg.lam) == (4, 16.0, 4.0, 0.05, 0.05)
  assert cfg.decoder_masks == "first_layer"  # their visual-text code, behind its published numbers (docs/mllm.md)
  for dataset in recipes.PUBLISHED:
    assert recipes.get(dataset, "moka").adapter.dropout == 0.05, dataset
    assert recipes.get(dataset, "mora").adapter.dropout == 0.1, dataset  # docs/method.md's, unchanged


def test_config_and_constructor_validation():
  with pytest.raises(ValueError, match="temperature='sqrt_dim'"):
    moka.MokAConfig(temperature="sqrt_dim")
  with pytest.raises(ValueError, match="scale_placement='before_b'.*after_b"):
    moka.MokAConfig(scale_placement="before_b")
  with pytest.raises(ValueError, match=r"decoder_masks='layer_0': use one of \('every_layer', 'first_layer'\)\.$"):
    moka.MokAConfig(decoder_masks="layer_0")
  assert moka.MokAConfig(lambdas=[1, 2]).lambdas == (1.0, 2.0)
  with pytest.raises(ValueError, match="lambdas has 2 entries for 3 modalities"):
    layer(config(lambdas=(0.1, 0.2)))
  base = Linear(D_IN, D_OUT, axes=("embed", "mlp"), std=0.5, rngs=nnx.Rngs(0))
  for bad in (partition.Trainable, nnx.Param):
    with pytest.raises(ValueError, match="variable_type"):
      moka.MokALinear(base, MODALITIES, config(), variable_type=bad, rngs=nnx.Rngs(0))
