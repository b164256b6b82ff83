"""MoRA against a direct transcription of docs/method.md (PyTorch layout, float64), and its two forms.

Tolerance 1e-5: ours runs in float32 (rounding ~6e-8 relative per op) on values of magnitude ~1; measured
differences are ~1e-6. Any formula error (a transposed factor, the wrong Gram matrix, a norm over the wrong
axis) changes outputs at the alpha * update scale, far above 1e-5 with the alpha used here.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mora_jax import adapters, clip
from mora_jax.adapters import partition
from tests import helpers

ALPHA = 0.5  # large, so that the shared and specific updates move W' well above float32 rounding
PARAM_NAMES = ("A_c", "B_c", "A_p", "B_p", "m_c", "m_p")


def mora_classifier(form: str = "fused", variant: str = "published", seed: int = 0):
  cfg = adapters.MoRAConfig(targets=("q_proj", "v_proj"), start_layer=1, rank=3, alpha=ALPHA, dropout=0.1,
                            form=form, variant=variant)
  return adapters.build_classifier(clip.init(helpers.tiny_config(), seed=seed), cfg, num_classes=4)


def layer(clf, tower: str):
  return (clf.backbone.vision_model if tower == "vision" else clf.backbone.text_model).encoder.layers[1].self_attn.q_proj


def layer_arrays(mora_layer) -> dict[str, np.ndarray]:
  return {"W": np.asarray(mora_layer.base.kernel[...]).T, "b": np.asarray(mora_layer.base.bias[...]),
          "A_c": np.asarray(mora_layer.common.A_c[...]), "B_c": np.asarray(mora_layer.common.B_c[...]),
          "A_p": np.asarray(mora_layer.A_p[...]), "B_p": np.asarray(mora_layer.B_p[...]),
          "m_c": np.asarray(mora_layer.m_c[...]), "m_p": np.asarray(mora_layer.m_p[...])}


def spec_forward(torch, p, x, tower: str):
  """docs/method.md, line by line, in PyTorch layout (W [out, in], m [1, in])."""
  W, b, A_c, B_c, A_p, B_p = (p[k] for k in ("W", "b", "A_c", "B_c", "A_p", "B_p"))
  m_c, m_p = p["m_c"].reshape(1, -1), p["m_p"].reshape(1, -1)
  S = A_c @ (B_c.T @ B_c) @ A_c.T if tower == "text" else B_c @ (A_c.T @ A_c) @ B_c.T
  P = A_p @ B_p
  N_c = W + ALPHA * S.T
  N_p = W + ALPHA * P.T
  V_c = N_c / torch.clamp(torch.linalg.norm(N_c, dim=0, keepdim=True), min=1e-5)
  V_p = N_p / torch.clamp(torch.linalg.norm(N_p, dim=0, keepdim=True), min=1e-5)
  W_eff = m_c * V_c + m_p * V_p
  return x @ W_eff.T + b, W_eff


def ours_value_and_grads(mora_layer, x, probe):
  graphdef, trainable, rest = nnx.split(mora_layer, partition.Trainable, ...)

  def loss(trainable):
    return jnp.sum(nnx.merge(graphdef, trainable, rest)(x) * probe)

  value, grads = jax.value_and_grad(loss)(trainable)
  flat = {str(path[-1]): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(grads)}
  return float(value), flat


@pytest.mark.parametrize("tower", ["text", "vision"])
@pytest.mark.parametrize("form", ["fused", "materialized"])
def test_projection_and_gradients_match_spec(tower, form):
  torch = pytest.importorskip("torch", reason="the reference transcription runs in torch float64")
  clf = mora_classifier(form)
  helpers.perturb_trainables(clf)
  mora_layer = layer(clf, tower)
  rng = np.random.RandomState(0)
  d = mora_layer.base.kernel.shape[0]
  x = rng.randn(5, 7, d).astype(np.float32)
  probe = rng.randn(5, 7, d).astype(np.float32)

  arrays = layer_arrays(mora_layer)
  ref = {k: torch.tensor(v, dtype=torch.float64, requires_grad=k in PARAM_NAMES) for k, v in arrays.items()}
  y_ref, _ = spec_forward(torch, ref, torch.tensor(x, dtype=torch.float64), tower)
  (y_ref * torch.tensor(probe, dtype=torch.float64)).sum().backward()

  y = np.asarray(mora_layer(x))
  np.testing.assert_allclose(y, y_ref.detach().numpy(), atol=1e-5, rtol=0)
  value, grads = ours_value_and_grads(mora_layer, x, probe)
  for name in PARAM_NAMES:
    scale = max(1.0, float(ref[name].grad.abs().max()))  # gradients are sums over 35 tokens
    np.testing.assert_allclose(grads[name], ref[name].grad.numpy(), atol=1e-5 * scale, rtol=0, err_msg=name)


def test_fused_and_materialized_agree_in_outputs_and_gradients():
  fused, materialized = mora_classifier("fused"), mora_classifier("materialized")
  helpers.perturb_trainables(fused)
  helpers.perturb_trainables(materialized)
  pixels, ids, mask = helpers.random_inputs(fused.backbone.config)

  def loss_and_grads(clf):
    graphdef, params = adapters.split(clf)

    def loss(trainable):
      return jnp.sum(adapters.join(graphdef, {**params, **trainable})(pixels, ids, mask) ** 2)

    return jax.jit(jax.value_and_grad(loss))(adapters.trainable(params))

  (loss_f, grads_f), (loss_m, grads_m) = loss_and_grads(fused), loss_and_grads(materialized)
  assert abs(float(loss_f) - float(loss_m)) <= 1e-5 * max(1.0, abs(float(loss_m)))
  for a, b in zip(jax.tree.leaves(grads_f), jax.tree.leaves(grads_m), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(np.abs(b).max())), rtol=0)


def test_effective_weight_at_init_published_and_identity_start():
  torch = pytest.importorskip("torch", reason="the reference transcription runs in torch float64")
  for tower in ("text", "vision"):
    mora_layer = layer(mora_classifier(), tower)
    p = {k: torch.tensor(v, dtype=torch.float64) for k, v in layer_arrays(mora_layer).items()}
    W = p["W"]
    col = torch.linalg.norm(W, dim=0, keepdim=True)
    S = (p["A_c"] @ (p["B_c"].T @ p["B_c"]) @ p["A_c"].T if tower == "text"
         else p["B_c"] @ (p["A_c"].T @ p["A_c"]) @ p["B_c"].T)
    expected = W + col * (W + ALPHA * S.T) / torch.linalg.norm(W + ALPHA * S.T, dim=0, keepdim=True)
    np.testing.assert_allclose(np.asarray(mora_layer.effective_kernel()).T, expected.numpy(), atol=1e-5)
    assert np.abs(expected.numpy() - 2 * W.numpy()).max() > 1e-2  # S really moves it off exactly 2W

    identity = layer(mora_classifier(variant="identity_start"), tower)
    np.testing.assert_allclose(np.asarray(identity.effective_kernel()), np.asarray(identity.base.kernel[...]),
                               atol=1e-6)


def test_common_pair_is_shared_across_towers_and_projections():
  clf = mora_classifier()
  attn_v = clf.backbone.vision_model.encoder.layers[1].self_attn
  attn_t = clf.backbone.text_model.encoder.layers[1].self_attn
  assert attn_v.q_proj.common is attn_v.v_proj.common is attn_t.q_proj.common is attn_t.v_proj.common
  _, params = adapters.split(clf)
  common_leaves = jax.tree.leaves(params["adapter"]["common"])
  assert len(common_leaves) == 2  # one A_c, one B_c for the single adapted layer index
  assert {leaf.shape for leaf in common_leaves} == {(32, 3)}


def recipe_count(targets, rank, num_classes):
  cfg = adapters.MoRAConfig(targets=targets, start_layer=10, rank=rank)
  clf = nnx.eval_shape(lambda: adapters.build_classifier(clip.init(clip.preset("ViT-B/16")), cfg, num_classes))
  return adapters.count_parameters(clf)


def test_published_trainable_counts():
  food = recipe_count(("q_proj", "v_proj"), 4, 101)
  assert food["trainable"] == 164_965
  assert food["per_partition"]["head"] == 103_525
  assert food["trainable"] - food["per_partition"]["head"] == 61_440
  assert food["backbone"] == 149_620_737
  assert round(100 * food["trainable"] / food["backbone"], 4) == 0.1103
  # Per layer: common (512 + 768) r; per projection: vision 2*768 r + 2*768, text 2*512 r + 2*512.
  expected = lambda r, classes: 2 * ((512 + 768) * r + 2 * (2 * 768 * r + 1536 + 2 * 512 * r + 1024)) + 1025 * classes
  imdb = recipe_count(("q_proj", "k_proj"), 4, 23)
  memes = recipe_count(("k_proj", "v_proj"), 8, 2)
  assert imdb["trainable"] == expected(4, 23) == 85_015
  assert memes["trainable"] == expected(8, 2) == 114_690
  print(f"MoRA trainable parameters (ViT-B/16): MM-IMDb {imdb['trainable']:,}, Food-101 {food['trainable']:,}, "
        f"Hateful Memes {memes['trainable']:,}")


def test_mora_rejects_non_square_targets():
  with pytest.raises(ValueError, match="square attention projections"):
    adapters.MoRAConfig(targets=("fc1",))
