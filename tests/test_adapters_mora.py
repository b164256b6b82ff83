"""MoRA against a direct transcription of docs/method.md (PyTorch layout, float64), and its two forms; the same
for its ablations (MoRAConfig.specific, MoRAConfig.gram; docs/method.md "Ablations").

Tolerance 1e-5: ours runs in float32 (rounding ~6e-8 relative per op) on values of magnitude ~1; measured
differences are ~1e-6. Any formula error (a transposed factor, the wrong Gram matrix, a norm over the wrong
axis) changes outputs at the alpha * update scale, far above 1e-5 with the alpha used here. The ablation tests give
the text tower another width (24) than the vision tower (32), so that a Gram or scale taken from the wrong tower
shows.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mora_jax import adapters, clip
from mora_jax.adapters import mora, partition
from mora_jax.train import recipes
from tests import helpers

ALPHA = 0.5  # large, so that the shared and specific updates move W' well above float32 rounding
RANK = 3
PARAM_NAMES = ("A_c", "B_c", "A_p", "B_p", "m_c", "m_p", "G")
# Every (specific, gram) combination; (True, "cross") is MoRA itself.
OPTIONS = [(specific, gram) for specific in (True, False) for gram in mora.GRAMS]
OPTION_IDS = [f"specific={specific}-gram={gram}" for specific, gram in OPTIONS]
TEXT_WIDTH = 24  # the ablation tests' text width; the tiny vision tower's is 32


def mora_classifier(form: str = "fused", variant: str = "published", seed: int = 0, specific: bool = True,
                    gram: str = "cross", text_width: int | None = None):
  cfg = adapters.MoRAConfig(targets=("q_proj", "v_proj"), start_layer=1, rank=RANK, alpha=ALPHA, dropout=0.1,
                            form=form, variant=variant, specific=specific, gram=gram)
  model = (helpers.tiny_config() if text_width is None
           else helpers.tiny_config(hidden_size=text_width, intermediate_size=2 * text_width))
  return adapters.build_classifier(clip.init(model, seed=seed), cfg, num_classes=4)


def layer(clf, tower: str):
  return (clf.backbone.vision_model if tower == "vision" else clf.backbone.text_model).encoder.layers[1].self_attn.q_proj


def layer_arrays(mora_layer) -> dict[str, np.ndarray]:
  """The layer's arrays by docs/method.md's names (W in PyTorch layout); those an ablation lacks are left out."""
  arrays = {"W": np.asarray(mora_layer.base.kernel[...]).T, "b": np.asarray(mora_layer.base.bias[...]),
            "A_c": np.asarray(mora_layer.common.A_c[...]), "B_c": np.asarray(mora_layer.common.B_c[...])}
  for owner, names in ((mora_layer, ("A_p", "B_p", "m_c", "m_p")), (mora_layer.common, ("G",))):
    arrays.update({name: np.asarray(getattr(owner, name)[...]) for name in names if hasattr(owner, name)})
  return arrays


def spec_forward(lib, p, x, tower: str, gram: str = "cross", specific: bool = True):
  """docs/method.md and its "Ablations", line by line, in PyTorch layout (W [out, in], m [1, in]); `lib` is numpy
  or torch (float64 arrays of either)."""
  if lib is np:
    colnorm = lambda N: np.maximum(np.linalg.norm(N, axis=0, keepdims=True), 1e-5)
  else:
    colnorm = lambda N: lib.clamp(lib.linalg.norm(N, dim=0, keepdim=True), min=1e-5)
  W, b, A_c, B_c = (p[k] for k in ("W", "b", "A_c", "B_c"))
  U, other = (A_c, B_c) if tower == "text" else (B_c, A_c)
  r = U.shape[1]
  if gram == "cross":  # text: A_c (B_c^T B_c) A_c^T; vision: B_c (A_c^T A_c) B_c^T
    G = other.T @ other
  elif gram == "none":  # the other tower's Gram replaced by its expectation at init, (d_other / r) I
    G = other.shape[0] / r * (np.eye(r) if lib is np else lib.eye(r, dtype=lib.float64))
  else:
    G = p["G"]
  S = U @ G @ U.T
  N_c = W + ALPHA * S.T
  W_eff = p["m_c"].reshape(1, -1) * (N_c / colnorm(N_c))
  if specific:
    N_p = W + ALPHA * (p["A_p"] @ p["B_p"]).T
    W_eff = W_eff + p["m_p"].reshape(1, -1) * (N_p / colnorm(N_p))
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
  check_against_torch_spec(torch, layer(clf, tower), tower)


def check_against_torch_spec(torch, mora_layer, tower: str, gram: str = "cross", specific: bool = True):
  """The layer's outputs and every trainable gradient against the float64 torch transcription."""
  rng = np.random.RandomState(0)
  d = mora_layer.base.kernel.shape[0]
  x = rng.randn(5, 7, d).astype(np.float32)
  probe = rng.randn(5, 7, d).astype(np.float32)

  arrays = layer_arrays(mora_layer)
  ref = {k: torch.tensor(v, dtype=torch.float64, requires_grad=k in PARAM_NAMES) for k, v in arrays.items()}
  y_ref, _ = spec_forward(torch, ref, torch.tensor(x, dtype=torch.float64), tower, gram, specific)
  (y_ref * torch.tensor(probe, dtype=torch.float64)).sum().backward()

  y = np.asarray(mora_layer(x))
  np.testing.assert_allclose(y, y_ref.detach().numpy(), atol=1e-5, rtol=0)
  value, grads = ours_value_and_grads(mora_layer, x, probe)
  names = [name for name in PARAM_NAMES if name in arrays]
  assert sorted(grads) == sorted(names)  # no trainable the transcription lacks, none it has missing
  for name in names:
    # gradients are sums over 35 tokens; B_c in the text tower (A_c in the vision one) has none without the cross
    # Gram, ref's .grad is then None
    expected = np.zeros(arrays[name].shape) if ref[name].grad is None else ref[name].grad.numpy()
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(grads[name], expected, atol=1e-5 * scale, rtol=0, err_msg=name)


@pytest.mark.parametrize(("specific", "gram"), OPTIONS, ids=OPTION_IDS)
def test_ablations_match_numpy_transcription(specific, gram):
  """Both forms' outputs and the effective weight (what `merge` writes) against docs/method.md's "Ablations"."""
  for form in ("fused", "materialized"):
    clf = mora_classifier(form, specific=specific, gram=gram, text_width=TEXT_WIDTH)
    helpers.perturb_trainables(clf)
    for tower in ("text", "vision"):
      mora_layer = layer(clf, tower)
      x = np.random.RandomState(0).randn(5, 7, mora_layer.base.kernel.shape[0]).astype(np.float32)
      arrays = {k: v.astype(np.float64) for k, v in layer_arrays(mora_layer).items()}
      y_ref, w_ref = spec_forward(np, arrays, x.astype(np.float64), tower, gram, specific)
      np.testing.assert_allclose(np.asarray(mora_layer(x)), y_ref, atol=1e-5, rtol=0, err_msg=f"{form} {tower}")
      np.testing.assert_allclose(np.asarray(mora_layer.effective_kernel()).T, w_ref, atol=1e-5, rtol=0,
                                 err_msg=f"{form} {tower}")


@pytest.mark.parametrize(("specific", "gram"), OPTIONS, ids=OPTION_IDS)
def test_ablations_gradients_match_spec(specific, gram):
  torch = pytest.importorskip("torch", reason="the reference transcription runs in torch float64")
  clf = mora_classifier("materialized", specific=specific, gram=gram, text_width=TEXT_WIDTH)
  helpers.perturb_trainables(clf)
  for tower in ("text", "vision"):
    check_against_torch_spec(torch, layer(clf, tower), tower, gram, specific)


@pytest.mark.parametrize("gram", mora.GRAMS)
def test_what_the_towers_share(gram):
  """cross: the text update depends on B_c (and the vision one on A_c); none: on neither, the towers share nothing;
  learned: on G only, which both towers read."""
  clf = mora_classifier("materialized", gram=gram, text_width=TEXT_WIDTH)
  helpers.perturb_trainables(clf)
  for tower, own, other in (("text", "A_c", "B_c"), ("vision", "B_c", "A_c")):
    mora_layer = layer(clf, tower)
    x = np.random.RandomState(0).randn(2, 3, mora_layer.base.kernel.shape[0]).astype(np.float32)
    _, grads = ours_value_and_grads(mora_layer, x, np.ones_like(x))
    assert np.abs(grads[own]).max() > 1e-3
    assert (np.abs(grads[other]).max() > 1e-3) == (gram == "cross"), (tower, other)
    assert ("G" in grads) == (gram == "learned")
    if gram == "learned":
      assert np.abs(grads["G"]).max() > 1e-3


@pytest.mark.parametrize(("specific", "gram"), [(True, "cross"), *OPTIONS], ids=["default", *OPTION_IDS])
def test_fused_and_materialized_agree_in_outputs_and_gradients(specific, gram):
  text_width = None if gram == "cross" and specific else TEXT_WIDTH
  kw = dict(specific=specific, gram=gram, text_width=text_width)
  fused, materialized = mora_classifier("fused", **kw), mora_classifier("materialized", **kw)
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


@pytest.mark.parametrize(("specific", "gram"), OPTIONS, ids=OPTION_IDS)
def test_merge_equals_unmerged(specific, gram):
  """The fused forward against the plain CLIP that `merge` writes from the materialised W'."""
  clf = mora_classifier("fused", specific=specific, gram=gram, text_width=TEXT_WIDTH)
  helpers.perturb_trainables(clf)
  pixels, ids, mask = helpers.random_inputs(clf.backbone.config)
  merged = adapters.merge(clf)
  assert type(layer(merged, "text")).__name__ == "Linear"
  unmerged_logits = np.asarray(clf(pixels, ids, mask))
  np.testing.assert_allclose(np.asarray(merged(pixels, ids, mask)), unmerged_logits,
                             atol=1e-5 * max(1.0, float(np.abs(unmerged_logits).max())), rtol=0)
  # The adapters move the logits far above that tolerance, so a merge that dropped them would fail.
  plain = adapters.build_classifier(clip.init(clf.backbone.config), None, num_classes=4)
  nnx.update(plain.head, nnx.state(clf.head))
  assert np.abs(np.asarray(plain(pixels, ids, mask)) - unmerged_logits).max() > 1e-3


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


@pytest.mark.parametrize("gram", mora.GRAMS)
def test_without_the_specific_path_at_init(gram):
  """specific=False: W' = ||W|| N_c / ||N_c|| per column at init (m_c = ||W||_col); learned G starts at
  ((d_text + d_vision) / 2r) I."""
  clf = mora_classifier(specific=False, gram=gram, text_width=TEXT_WIDTH)
  for tower in ("text", "vision"):
    mora_layer = layer(clf, tower)
    p = {k: v.astype(np.float64) for k, v in layer_arrays(mora_layer).items()}
    W = p["W"]
    np.testing.assert_allclose(p["m_c"], np.linalg.norm(W, axis=0), rtol=1e-6)
    if gram == "learned":
      np.testing.assert_allclose(p["G"], (TEXT_WIDTH + 32) / (2 * RANK) * np.eye(RANK), rtol=1e-7, atol=0)
    _, w_ref = spec_forward(np, p, np.zeros((1, W.shape[1])), tower, gram, specific=False)
    np.testing.assert_allclose(np.asarray(mora_layer.effective_kernel()).T, w_ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(w_ref, axis=0), np.linalg.norm(W, axis=0), rtol=1e-6)  # ||W'|| = ||W||


def test_ablation_grams_keep_the_cross_grams_scale_at_init():
  """The premise of gram="none" and "learned": E[F^T F] = (d / r) I for the init of a common factor F [d, r], so
  "none" (the other tower's Gram replaced by that expectation) gives updates S of the cross form's size, and
  "learned" ones (d_text + d_vision) / (2 d_other) of it; S = U U^T alone would be r / d_other of it."""
  d_text, d_vision, rank, seeds = 64, 96, 4, 64
  grams, ratios = {"text": [], "vision": []}, {(gram, tower): [] for gram in ("none", "learned")
                                                for tower in ("text", "vision")}
  for seed in range(seeds):
    commons = {gram: mora.MoRACommon(d_text, d_vision, rank, gram, rngs=nnx.Rngs(seed)) for gram in mora.GRAMS}
    grams["text"].append(np.asarray(commons["cross"].factors("text")[1]))
    grams["vision"].append(np.asarray(commons["cross"].factors("vision")[1]))
    for tower in ("text", "vision"):
      size = lambda gram: np.linalg.norm(np.asarray((lambda u, g: u @ g @ u.T)(*commons[gram].factors(tower))))
      for gram in ("none", "learned"):
        ratios[gram, tower].append(size(gram) / size("cross"))
  # The text tower's Gram is B_c's: mean (d_vision / r) I. Entry std sqrt(d / r^2) / sqrt(seeds) ~ 0.3 here.
  np.testing.assert_allclose(np.mean(grams["text"], axis=0), mora.gram_at_init(d_vision, rank) * np.eye(rank),
                             atol=1.5)
  np.testing.assert_allclose(np.mean(grams["vision"], axis=0), mora.gram_at_init(d_text, rank) * np.eye(rank),
                             atol=1.5)
  assert mora.gram_at_init(d_vision, rank) == 24 and mora.gram_at_init(d_text, rank) == 16
  mean = lambda values: float(np.mean(values))
  assert abs(mean(ratios["none", "text"]) - 1) < 0.05 and abs(mean(ratios["none", "vision"]) - 1) < 0.05
  half = (d_text + d_vision) / 2
  assert abs(mean(ratios["learned", "text"]) - half / d_vision) < 0.05
  assert abs(mean(ratios["learned", "vision"]) - half / d_text) < 0.05


def test_common_pair_is_shared_across_towers_and_projections():
  clf = mora_classifier()
  attn_v = clf.backbone.vision_model.encoder.layers[1].self_attn
  attn_t = clf.backbone.text_model.encoder.layers[1].self_attn
  assert attn_v.q_proj.common is attn_v.v_proj.common is attn_t.q_proj.common is attn_t.v_proj.common
  _, params = adapters.split(clf)
  common_leaves = jax.tree.leaves(params["adapter"]["common"])
  assert len(common_leaves) == 2  # one A_c, one B_c for the single adapted layer index
  assert {leaf.shape for leaf in common_leaves} == {(32, 3)}


def recipe_count(targets, rank, num_classes, **options):
  cfg = adapters.MoRAConfig(targets=targets, start_layer=10, rank=rank, **options)
  clf = nnx.eval_shape(lambda: adapters.build_classifier(clip.init(clip.preset("ViT-B/16")), cfg, num_classes))
  return adapters.count_parameters(clf)


def test_published_trainable_counts():
  """The datasets' MoRA recipes (configs/*_mora.py) on ViT-B/16."""
  for dataset, (targets, rank) in {"upmc_food101": (("q_proj", "v_proj"), 4), "mm_imdb": (("q_proj", "k_proj"), 4),
                                   "hateful_memes": (("k_proj", "v_proj"), 8)}.items():
    recipe = adapters.from_config(recipes.get(dataset, "mora").adapter.to_dict())
    assert (recipe.targets, recipe.rank, recipe.start_layer) == (targets, rank, 10), dataset
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


@pytest.mark.parametrize(("specific", "gram"), OPTIONS, ids=OPTION_IDS)
def test_ablation_trainable_counts(specific, gram):
  """Food-101's recipe (q, v; r = 4; 2 adapted layers): per layer the common (512 + 768) r (+ r^2 for a learned
  G); per projection the specific 2 d r + 2 d with the specific path, d (m_c) without it."""
  food = recipe_count(("q_proj", "v_proj"), 4, 101, specific=specific, gram=gram)
  per_projection = (lambda d: 2 * d * 4 + 2 * d) if specific else (lambda d: d)
  common = 2 * ((512 + 768) * 4 + (16 if gram == "learned" else 0))
  parts = food["per_partition"]
  assert parts["adapter/common"] == common
  assert parts["adapter/specific/vision"] == 2 * 2 * per_projection(768)
  assert parts["adapter/specific/text"] == 2 * 2 * per_projection(512)
  assert food["trainable"] == {(True, "cross"): 164_965, (True, "none"): 164_965, (True, "learned"): 164_997,
                               (False, "cross"): 118_885, (False, "none"): 118_885,
                               (False, "learned"): 118_917}[specific, gram]
  assert food["backbone"] == 149_620_737


@pytest.mark.parametrize(("specific", "gram"), OPTIONS, ids=OPTION_IDS)
def test_ablation_partitions(specific, gram):
  _, params = adapters.split(mora_classifier(specific=specific, gram=gram, text_width=TEXT_WIDTH))
  names = lambda state: sorted({str(path[-1]) for path, _ in nnx.to_flat_state(state)})
  common = ["A_c", "B_c", "G"] if gram == "learned" else ["A_c", "B_c"]
  specific_names = ["A_p", "B_p", "m_c", "m_p"] if specific else ["m_c"]
  assert names(params["adapter"]["common"]) == common
  assert names(params["adapter"]["specific"]["vision"]) == names(params["adapter"]["specific"]["text"]) == specific_names
  if gram == "learned":
    shapes = [v.get_value().shape for path, v in nnx.to_flat_state(params["adapter"]["common"]) if path[-1] == "G"]
    assert shapes == [(RANK, RANK)]  # one G for the single adapted layer index


def test_ablation_options_in_run_configs():
  """Configs written before the options load with MoRA's defaults; the options round-trip."""
  old = adapters.from_config({"method": "mora", "rank": 4})
  assert (old.specific, old.gram) == (True, "cross")
  ablation = adapters.MoRAConfig(specific=False, gram="learned")
  assert adapters.from_config(adapters.to_config(ablation)) == ablation


@pytest.mark.parametrize(("values", "message"), [
    (dict(gram="shared"), "MoRAConfig.gram='shared': use 'cross', 'none' or 'learned'"),
    (dict(specific="no"), "MoRAConfig.specific='no': use True or False"),
    (dict(specific=False, variant="identity_start"), "variant='identity_start' needs specific=True"),
])
def test_mora_rejects_invalid_ablation_values(values, message):
  with pytest.raises(ValueError, match=message):
    adapters.MoRAConfig(**values)


def test_mora_rejects_non_square_targets():
  with pytest.raises(ValueError, match="square attention projections"):
    adapters.MoRAConfig(targets=("fc1",))
