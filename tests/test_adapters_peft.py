"""PEFT interop: our LoRA/DoRA exported to PEFT and PEFT's imported into ours give the same CLIP features as
transformers' CLIPModel under peft.PeftModel; MoRA and MokA are refused, and so is a file cut short, by name."""

import json
import re
import types

import numpy as np
import pytest
import safetensors.numpy

from mora_jax import adapters, clip
from mora_jax.adapters import peft as peft_io
from tests import helpers



@pytest.fixture(scope="module")
def ref():
  """PyTorch, transformers and peft: the parity reference; skipped where they are not installed (Python >= 3.12).
  The refusals below need none of them."""
  return types.SimpleNamespace(torch=pytest.importorskip("torch"), transformers=pytest.importorskip("transformers"),
                               peft=pytest.importorskip("peft"))


# Float32 on both sides; the towers differ only in summation order (XLA vs PyTorch matmuls, attention and
# layer norms through 2 layers): measured <= 1e-6 on these features of magnitude <= 3.7. 1e-4 leaves room, yet a wrong transpose,
# scale or magnitude is off by O(0.1).
ATOL = 1e-4
METHODS = {
    "lora": adapters.LoRAConfig(targets=("q_proj", "k_proj", "out_proj", "fc1"), start_layer=0, rank=3, alpha=6.0),
    "dora": adapters.DoRAConfig(targets=("v_proj", "fc2"), start_layer=1, rank=3, alpha=6.0),
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
  return clip.save_pretrained(clip.init(helpers.tiny_config(), seed=0), tmp_path_factory.mktemp("base") / "clip")


def torch_features(ref, model, inputs) -> np.ndarray:
  pixels, ids, mask = (ref.torch.tensor(x) for x in inputs)
  with ref.torch.no_grad():
    image = model.get_image_features(pixel_values=pixels).pooler_output
    text = model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
  return np.concatenate([image.numpy(), text.numpy()], -1)


def peft_model(ref, base_dir, adapter_dir):
  base = ref.transformers.CLIPModel.from_pretrained(base_dir, attn_implementation="eager")
  return ref.peft.PeftModel.from_pretrained(base, adapter_dir).eval()


def ours(base_dir, cfg):
  return adapters.build_classifier(clip.from_pretrained(base_dir), cfg, num_classes=2)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_export_loads_in_peft_with_our_features(method, base_dir, tmp_path, ref):
  clf = ours(base_dir, METHODS[method])
  helpers.perturb_trainables(clf)
  out = peft_io.save(clf, tmp_path / "adapter", base_model=str(base_dir))
  inputs = helpers.random_inputs(clf.backbone.config)
  np.testing.assert_allclose(torch_features(ref, peft_model(ref, base_dir, out), inputs), np.asarray(clf.features(*inputs)),
                             atol=ATOL, rtol=0)
  # ... and back: the export imports into exactly the same parameters.
  again = ours(base_dir, peft_io.read_config(out))
  peft_io.load_into(again, out)
  assert again.adapter == clf.adapter
  np.testing.assert_array_equal(np.asarray(again.features(*inputs)), np.asarray(clf.features(*inputs)))


@pytest.mark.parametrize("use_dora,use_rslora", [(False, False), (True, False), (False, True)])
def test_peft_saved_adapter_imports_with_peft_features(use_dora, use_rslora, base_dir, tmp_path, ref):
  torch = ref.torch
  # Any layer set: q_proj in layer 0 and fc1 in layer 1 only; the vision tower alone for fc1.
  torch.manual_seed(0)
  base = ref.transformers.CLIPModel.from_pretrained(base_dir, attn_implementation="eager")
  config = ref.peft.LoraConfig(r=2, lora_alpha=5, use_dora=use_dora, use_rslora=use_rslora,
                           target_modules=r"(text|vision)_model\.encoder\.layers\.0\.self_attn\.q_proj"
                                          r"|vision_model\.encoder\.layers\.1\.mlp\.fc1")
  model = ref.peft.get_peft_model(base, config)
  with torch.no_grad():  # PEFT starts B at zero: move every factor and magnitude so each term counts
    for name, param in model.named_parameters():
      if "lora_" in name:
        param.add_(0.3 * torch.randn_like(param))
  model.save_pretrained(tmp_path / "adapter")
  inputs = helpers.random_inputs(helpers.tiny_config())
  expected = torch_features(ref, model.eval(), inputs)

  cfg = peft_io.read_config(tmp_path / "adapter")
  assert cfg == (adapters.DoRAConfig if use_dora else adapters.LoRAConfig)(
      targets=("q_proj", "fc1"), start_layer=0, rank=2, alpha=5.0 * (2**0.5 if use_rslora else 1), dropout=0.0)
  clf = ours(base_dir, cfg)
  peft_io.load_into(clf, tmp_path / "adapter")
  np.testing.assert_allclose(np.asarray(clf.features(*inputs)), expected, atol=ATOL, rtol=0)
  # The same features from a fresh PeftModel load of that directory (what PEFT users do).
  np.testing.assert_allclose(torch_features(ref, peft_model(ref, base_dir, tmp_path / "adapter"), inputs), expected, atol=ATOL,
                             rtol=0)


@pytest.mark.parametrize("method", ["mora", "moka"])
def test_methods_without_a_peft_type_are_refused(method):
  cfg = adapters.from_config({"method": method, "start_layer": 1})
  clf = adapters.build_classifier(clip.init(helpers.tiny_config(), seed=0), cfg, num_classes=2)
  with pytest.raises(ValueError, match="no PEFT type") as error:
    peft_io.to_peft(clf)
  assert "--export_hf" in str(error.value)


def test_mismatched_import_is_refused(base_dir, tmp_path):
  out = peft_io.save(ours(base_dir, METHODS["dora"]), tmp_path / "adapter")
  with pytest.raises(ValueError, match="rank 3"):
    peft_io.load_into(ours(base_dir, adapters.DoRAConfig(targets=("v_proj", "fc2"), start_layer=1, rank=4)), out)
  with pytest.raises(ValueError, match="does not"):
    peft_io.load_into(ours(base_dir, adapters.DoRAConfig(targets=("v_proj",), start_layer=1, rank=3, alpha=6.0)), out)
  config = json.loads((out / peft_io.CONFIG_FILE).read_text())
  (out / peft_io.CONFIG_FILE).write_text(json.dumps({**config, "bias": "all"}))
  with pytest.raises(ValueError, match="bias"):
    peft_io.read_config(out)


@pytest.mark.parametrize("cut", [peft_io.CONFIG_FILE, peft_io.WEIGHTS_FILE])
def test_a_file_cut_short_is_one_error_naming_it_and_the_fix(tmp_path, cut):
  safetensors.numpy.save_file({f"{peft_io.PREFIX}vision_model.encoder.layers.0.self_attn.q_proj.lora_A.weight":
                               np.zeros((2, 8), np.float32)}, tmp_path / peft_io.WEIGHTS_FILE)
  (tmp_path / peft_io.CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
  path = tmp_path / cut
  path.write_bytes(path.read_bytes()[:20])
  with pytest.raises(ValueError, match=f"^{re.escape(str(path))} does not read as .*: cut short or damaged\\? Save "
                     "the adapter again with PEFT's save_pretrained"):
    peft_io.read_config(tmp_path)
