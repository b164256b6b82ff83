"""MMP and DCP: DCP against a loop-by-loop transcription of its definition (docs/prompts.md; PyTorch float64,
one sample and one layer at a time), batching, what is trained, and the parameter counts on ViT-B/16.

Tolerance 1e-5 (absolute and relative): ours runs in float32 (rounding ~6e-8 relative per op) through two
2-layer towers and the prompt modules on values of magnitude ~1; measured differences are ~1e-6. A wrong
gather (another case's prompts), a misplaced token or a wrong readout position changes outputs by O(0.1).
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mora_jax import adapters, clip
from mora_jax.adapters import optim, partition, prompts
from tests import helpers

MISSING = np.array([0, 1, 2, 2, 1, 0])  # every missing case, twice, in one batch
TOL = dict(rtol=1e-5, atol=1e-5)


def prompt_classifier(adapter, seed: int = 0) -> adapters.Classifier:
  clf = adapters.build_classifier(clip.init(helpers.tiny_config(), seed=seed), adapter, num_classes=4)
  helpers.perturb_trainables(clf)  # off the init: MMP's one-hot prompts, zero attention biases, unit LayerNorms
  return clf


def inputs(batch: int = len(MISSING)):
  pixels, ids, mask = helpers.random_inputs(helpers.tiny_config(), batch=batch, length=12)
  return pixels, ids.astype(np.int32), mask.astype(np.int32)


def flat(tree) -> dict[str, np.ndarray]:
  """An nnx.State, or a nested dict of them (the partitioned tree), as {"a/b/c": value}."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda v: isinstance(v, nnx.Variable))
  name = lambda path: "/".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path)
  return {name(path): np.asarray(v.get_value() if isinstance(v, nnx.Variable) else v) for path, v in leaves}


def ours_logits_and_grads(clf, pixels, ids, mask, missing, probe):
  graphdef, trainable, rest = nnx.split(clf, partition.Trainable, ...)

  def loss(trainable):
    logits = nnx.merge(graphdef, trainable, rest)(pixels, ids, mask, missing=jnp.asarray(missing))
    return jnp.sum(logits * probe), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)
  return np.asarray(logits), flat(grads)


class Reference:
  """docs/prompts.md's DCP, transcribed sample by sample and layer by layer (PyTorch, float64), reading our
  parameters by path."""

  def __init__(self, torch, params: dict, trained: set, cfg: adapters.DCPConfig, model: clip.CLIPConfig):
    self.torch, self.cfg, self.model = torch, cfg, model
    self.p = {k: torch.tensor(v, dtype=torch.float64, requires_grad=k in trained) for k, v in params.items()}

  def linear(self, x, name):
    return x @ self.p[f"{name}/kernel"] + self.p[f"{name}/bias"]

  def norm(self, x, name):
    return self.torch.nn.functional.layer_norm(x, x.shape[-1:], self.p[f"{name}/scale"], self.p[f"{name}/bias"],
                                               1e-5)

  def bottleneck(self, x, name):
    return self.linear(self.torch.nn.functional.gelu(self.linear(x, f"{name}/fc1")), f"{name}/fc2")

  def correlated(self, case: int):
    """Per layer, (image prompts, text prompts) of `case`: the chain from the base prompts."""
    image = self.p["prompts/image_base"][1 if case == 2 else 0]  # the "missing" base when the image is missing
    text = self.p["prompts/text_base"][1 if case == 1 else 0]
    layers = []
    if self.cfg.variant == "paper":
      layers.append((image, text))  # layer 0: the learned base prompts themselves
    for layer in range(len(layers), self.cfg.depth):
      index = layer if self.cfg.variant == "code" else layer - 1
      both = self.torch.cat([image, text], dim=-1)
      new = []
      for tower in ("vision", "text"):
        name = f"prompts/correlated_{tower}/{index}"
        if self.cfg.variant == "code":  # MLP(LN(concat))
          new.append(self.bottleneck(self.norm(both, f"{name}/norm"), f"{name}/mlp"))
        else:  # LN(MLP(concat))
          new.append(self.norm(self.bottleneck(both, f"{name}/mlp"), f"{name}/norm"))
      image, text = new
      layers.append((image, text))
    return layers

  def dynamic(self, tower: str, case: int, x0):
    name = f"prompts/dynamic_{tower}"
    q = self.p[f"{name}/queries"][case] @ self.p[f"{name}/q_kernel"] + self.p[f"{name}/q_bias"]
    k = x0 @ self.p[f"{name}/k_kernel"] + self.p[f"{name}/k_bias"]
    v = x0 @ self.p[f"{name}/v_kernel"] + self.p[f"{name}/v_bias"]
    weights = self.torch.softmax(q @ k.T / q.shape[-1]**0.5, dim=-1)
    out = weights @ v @ self.p[f"{name}/out_kernel"] + self.p[f"{name}/out_bias"]
    if self.cfg.variant == "paper":  # LN(MLP(LN(attention)))
      out = self.norm(self.bottleneck(self.norm(out, f"{name}/refine/0"), f"{name}/refine/1"), f"{name}/refine/2")
    return out

  def block(self, x, prefix: str, heads: int, causal: bool):
    torch = self.torch
    h = self.norm(x, f"{prefix}/layer_norm1")
    q, k, v = (self.linear(h, f"{prefix}/self_attn/{n}_proj").reshape(len(x), heads, -1).transpose(0, 1)
               for n in ("q", "k", "v"))
    logits = q @ k.transpose(1, 2) / q.shape[-1]**0.5
    if causal:  # every position sees the positions before it, prompts first (no padding mask, as DCP's code)
      logits = logits.masked_fill(torch.triu(torch.ones(len(x), len(x), dtype=torch.bool), 1), float("-inf"))
    out = (torch.softmax(logits, -1) @ v).transpose(0, 1).reshape(len(x), -1)
    x = x + self.linear(out, f"{prefix}/self_attn/out_proj")
    h = self.linear(self.norm(x, f"{prefix}/layer_norm2"), f"{prefix}/mlp/fc1")
    return x + self.linear(h * torch.sigmoid(1.702 * h), f"{prefix}/mlp/fc2")

  def encode(self, tower: str, x, case: int, causal: bool, layers: int, heads: int):
    chain = [pair[0 if tower == "vision" else 1] for pair in self.correlated(case)]
    common = self.bottleneck(self.p["prompts/common"][case], f"prompts/common_{tower}")
    dynamic = self.dynamic(tower, case, x)
    g = self.cfg.group
    for layer in range(layers):
      if layer == 0:
        x = self.torch.cat([chain[0], common, dynamic, x])
      elif layer < self.cfg.depth:
        x = self.torch.cat([chain[layer], x[g:]])
      x = self.block(x, f"backbone/{tower}_model/encoder/layers/{layer}", heads, causal)
    return x

  def logits(self, pixels, ids, missing):
    torch, p, m, length = self.torch, self.p, self.model, self.cfg.length
    rows = []
    for pixel, tokens, case in zip(pixels, ids, missing):
      case = int(case)
      v = "backbone/vision_model"
      kernel = p[f"{v}/embeddings/patch_embedding/kernel"].permute(3, 2, 0, 1)
      patches = torch.nn.functional.conv2d(torch.tensor(pixel[None], dtype=torch.float64), kernel,
                                           stride=m.vision.patch_size)[0].flatten(1).T
      x = torch.cat([p[f"{v}/embeddings/class_embedding"][None], patches])
      x = self.norm(x + p[f"{v}/embeddings/position_embedding/embedding"], f"{v}/pre_layrnorm")
      x = self.encode("vision", x, case, False, m.vision.num_hidden_layers, m.vision.num_attention_heads)
      image = self.norm(x[length], f"{v}/post_layernorm") @ p["backbone/visual_projection/kernel"]
      t = "backbone/text_model"
      x = p[f"{t}/embeddings/token_embedding/embedding"][torch.tensor(tokens, dtype=torch.long)]
      x = x + p[f"{t}/embeddings/position_embedding/embedding"][:len(tokens)]
      x = self.encode("text", x, case, True, m.text.num_hidden_layers, m.text.num_attention_heads)
      x = self.norm(x[length:], f"{t}/final_layer_norm")  # the prompts dropped, then the EOS token
      eos = int(np.argmax(tokens == m.text.eos_token_id))
      text = x[eos] @ p["backbone/text_projection/kernel"]
      if case == 2:  # zero_missing_features (on), or the paper's zero tensor for the missing modality
        image = image * 0
      if case == 1:
        text = text * 0
      rows.append(torch.cat([image, text]) @ p["head/kernel"] + p["head/bias"])
    return torch.stack(rows)


@pytest.mark.parametrize("variant", ["code", "paper"])
def test_dcp_matches_a_per_sample_per_layer_transcription(variant):
  torch = pytest.importorskip("torch", reason="the reference transcription runs in torch float64")
  cfg = adapters.DCPConfig(length=6, depth=2, variant=variant, reduction=4)
  clf = prompt_classifier(cfg)
  pixels, ids, mask = inputs()
  probe = np.random.RandomState(2).randn(len(MISSING), 4).astype(np.float32)
  logits, grads = ours_logits_and_grads(clf, pixels, ids, mask, MISSING, probe)

  trained = set(flat(nnx.state(clf, partition.Trainable)))
  ref = Reference(torch, flat(nnx.state(clf)), trained, cfg, clf.backbone.config)
  ref_logits = ref.logits(pixels, ids, MISSING)
  (ref_logits * torch.tensor(probe, dtype=torch.float64)).sum().backward()

  np.testing.assert_allclose(logits, ref_logits.detach().numpy(), **TOL)
  assert set(grads) == trained
  for name in sorted(trained):
    np.testing.assert_allclose(grads[name], ref.p[name].grad.numpy(), err_msg=name, **TOL)
  # Every case reached the loss: each selects its own base, common and query rows.
  assert np.all(np.abs(grads["prompts/common"]).sum(axis=(1, 2)) > 0)


@pytest.mark.parametrize("adapter", [adapters.MMPConfig(length=6, depth=2),
                                     adapters.DCPConfig(length=6, depth=2, reduction=4),
                                     adapters.DCPConfig(length=6, depth=2, reduction=4, variant="paper")],
                         ids=["mmp", "dcp-code", "dcp-paper"])
def test_a_mixed_batch_equals_its_samples_one_at_a_time(adapter):
  clf = prompt_classifier(adapter)
  graphdef, state = nnx.split(clf)
  forward = jax.jit(lambda state, *batch: nnx.merge(graphdef, state)(*batch[:3], missing=batch[3]))
  pixels, ids, mask = inputs()
  together = np.asarray(forward(state, pixels, ids, mask, MISSING))
  alone = np.concatenate([np.asarray(forward(state, pixels[i:i + 1], ids[i:i + 1], mask[i:i + 1], MISSING[i:i + 1]))
                          for i in range(len(MISSING))])
  # float32 rounding only (batched matmuls of another size sum in another order: ~1e-6 measured).
  np.testing.assert_allclose(together, alone, **TOL)
  # ... and the prompts depend on the case: the same sample under another case gives other logits.
  other = np.asarray(forward(state, pixels[:1], ids[:1], mask[:1], np.array([1])))
  assert np.abs(other - together[:1]).max() > 1e-3


def test_mmp_map_init_is_maps_one_hot_rows():
  clf = adapters.build_classifier(clip.init(helpers.tiny_config()),
                                  adapters.MMPConfig(length=4, depth=2, init="map"), 4)
  vision = np.asarray(clf.prompts.vision[...])  # [case, layer, token, width]
  for case, row in prompts.MAP_ROW.items():
    assert np.all(vision[case, :, row] == 1) and np.abs(vision[case]).sum() == vision[case, :, row].size


@pytest.mark.parametrize("std", [0.05, 0.3, 1.0])
def test_mmp_normal_init_has_its_statistics(std):
  cfg = adapters.MMPConfig(length=8, depth=2, init="normal", init_std=std)
  model = clip.init(helpers.tiny_config())
  clf = adapters.build_classifier(model, cfg, 4)
  for values, width in ((clf.prompts.vision[...], model.config.vision.hidden_size),
                        (clf.prompts.text[...], model.config.text.hidden_size)):
    values = np.asarray(values)
    assert values.shape == (prompts.CASES, 2, 8, width)
    # >= 3 * 2 * 8 * 32 values: the sample std is within ~2% of init_std, the mean within ~0.03 std of 0.
    assert abs(values.std() / std - 1) < 0.1 and abs(values.mean()) < 0.15 * std
    # Every token its own draw: no two tokens of a case and layer alike, even after LayerNorm.
    centred = values - values.mean(-1, keepdims=True)
    normed = centred / centred.std(-1, keepdims=True)
    gaps = np.abs(normed[:, :, :, None] - normed[:, :, None]).max(-1)  # [case, layer, token, token]
    assert np.all(gaps + np.eye(8) * 10 > 0.5)


def test_maps_init_gives_every_token_of_a_layer_the_same_gradient():
  """MAP's rows are constant vectors, which the blocks' pre-LayerNorm maps to its bias alike: the tokens of a
  case and layer are interchangeable, get bit-for-bit the same gradient, and so stay one token repeated `length`
  times (MAP's ViLT breaks the tie with dropout; CLIP's towers have none). The normal init does not tie them."""
  pixels, ids, mask = inputs()
  probe = np.random.RandomState(2).randn(len(MISSING), 4).astype(np.float32)
  spreads = {}
  for init in ("map", "normal"):
    clf = adapters.build_classifier(clip.init(helpers.tiny_config()),
                                    adapters.MMPConfig(length=4, depth=2, init=init), 4)
    _, grads = ours_logits_and_grads(clf, pixels, ids, mask, MISSING, probe)
    for tower in ("vision", "text"):
      g = grads[f"prompts/{tower}"]  # [case, layer, token, width]
      assert np.abs(g).max() > 0
      spreads[init, tower] = np.abs(g - g[:, :, :1]).max() / np.abs(g).max()
  assert spreads["map", "vision"] < 1e-6 and spreads["map", "text"] < 1e-6, spreads
  assert spreads["normal", "vision"] > 1e-2 and spreads["normal", "text"] > 1e-2, spreads


@pytest.mark.parametrize("trainable_queries", [False, True])
def test_fixed_dynamic_queries_are_neither_differentiated_nor_optimised(trainable_queries):
  cfg = adapters.DCPConfig(length=6, depth=2, reduction=4, trainable_queries=trainable_queries)
  clf = prompt_classifier(cfg)
  _, params = adapters.split(clf)
  trainable = adapters.trainable(params)
  in_trained = [k for k in flat(trainable) if k.endswith("queries")]
  in_backbone = [k for k in flat(params["backbone"]) if k.endswith("queries")]
  opt_state = optim.adamw(1e-2, 0.02).init(trainable)
  in_optimizer = [path for path in jax.tree_util.tree_flatten_with_path(opt_state)[0]
                  if "queries" in jax.tree_util.keystr(path[0])]
  if trainable_queries:
    assert len(in_trained) == 2 and not in_backbone and in_optimizer
  else:
    assert not in_trained and len(in_backbone) == 2 and not in_optimizer
    pixels, ids, mask = inputs()
    _, grads = ours_logits_and_grads(clf, pixels, ids, mask, MISSING, np.ones((len(MISSING), 4), np.float32))
    assert not [k for k in grads if k.endswith("queries")]


def test_trained_backbone_parts_are_their_own_partition():
  clf = prompt_classifier(adapters.DCPConfig(length=6, depth=2, reduction=4))
  _, params = adapters.split(clf)
  trained = flat(params["backbone_trained"])
  assert sorted(trained) == ["backbone/text_model/final_layer_norm/bias",
                             "backbone/text_model/final_layer_norm/scale",
                             "backbone/vision_model/post_layernorm/bias",
                             "backbone/vision_model/post_layernorm/scale",
                             "backbone/visual_projection/kernel"]
  assert not any(k.startswith("backbone/text_projection") for k in trained)
  with pytest.raises(ValueError, match="merged"):
    adapters.merge(clf)


def test_missing_codes_are_required_and_depth_is_checked():
  clf = prompt_classifier(adapters.MMPConfig(length=4, depth=2))
  pixels, ids, mask = inputs(2)
  with pytest.raises(ValueError, match="missing=\\[B\\] ints"):
    clf(pixels, ids, mask)
  with pytest.raises(ValueError, match="adapter.depth <= 2"):
    adapters.build_classifier(clip.init(helpers.tiny_config()), adapters.DCPConfig(depth=3), 4)


# DCP's own count (PROMPTS.md): prompt learner ~2.0M, the two attention modules ~3.4M, the vision projection
# 0.39M, ~5.8M in all; the paper states 4.0M.
VIT_B16_DCP = {
    "code": {"correlated prompts": 1_913_280, "modal-common prompts": 93_504,
             "dynamic prompts (attention)": 3_412_992, "post_layernorm": 1_536, "final_layer_norm": 1_024,
             "visual_projection": 393_216, "head": 103_525, "trained in all": 5_919_077,
             "fixed (frozen, not trained)": 46_080},
    "paper": {"correlated prompts": 1_586_720, "modal-common prompts": 93_504,
              "dynamic prompts (attention)": 3_525_968, "post_layernorm": 1_536, "final_layer_norm": 1_024,
              "visual_projection": 393_216, "head": 103_525, "trained in all": 5_705_493,
              "fixed (frozen, not trained)": 46_080},
}


@pytest.mark.parametrize("variant", ["code", "paper"])
def test_dcp_parameter_count_on_vit_b16_per_part(variant):
  cfg = clip.preset("ViT-B/16")
  clf = nnx.eval_shape(lambda: adapters.build_classifier(clip.init(cfg), adapters.DCPConfig(variant=variant), 101))
  parts = prompts.parameter_parts(clf)
  print(f"DCP ({variant}) on ViT-B/16, Food-101 head:", {k: f"{v / 1e6:.3f}M" for k, v in parts.items()})
  assert parts == VIT_B16_DCP[variant]
  if variant == "code":
    learner = parts["correlated prompts"] + parts["modal-common prompts"]
    assert round(learner / 1e6, 1) == 2.0 and round(parts["dynamic prompts (attention)"] / 1e6, 1) == 3.4
    extra = learner + parts["dynamic prompts (attention)"] + parts["visual_projection"]
    assert round(extra / 1e6, 1) == 5.8  # the code's count; the paper's 4.0M matches no grouping of its modules
  assert parts["trained in all"] == adapters.count_parameters(clf)["trainable"]
