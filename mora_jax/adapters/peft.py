"""LoRA and DoRA adapters <-> Hugging Face PEFT adapter directories (for a transformers `CLIPModel`).

    peft.save(clf, out_dir)                        # adapter_config.json + adapter_model.safetensors
    cfg = peft.read_config(peft_dir)                # the smallest LoRAConfig / DoRAConfig covering the file
    clf = adapters.build_classifier(backbone, cfg, num_classes)
    peft.load_into(clf, peft_dir)                   # the file's factors (and magnitudes) into clf

    # PyTorch side: peft.PeftModel.from_pretrained(transformers.CLIPModel.from_pretrained(base), out_dir)

PEFT's layout: `base_model.model.<module>.lora_A.weight` [r, in], `.lora_B.weight` [out, r] (ours are their
transposes: lora_A [in, r], lora_B [r, out]) and, for DoRA, `.lora_magnitude_vector` [out] (our `magnitude`,
per output feature). Its scale is lora_alpha / r (lora_alpha / sqrt(r) with use_rslora). Our module paths are
Hugging Face's, so `<module>` is e.g. `vision_model.encoder.layers.3.self_attn.q_proj`.

Our configs adapt the same `targets` in every layer from `start_layer` on. A PEFT adapter of any other layer
set imports into the smallest such config that covers it; the projections the file leaves out keep their
initial values, which are the identity (B = 0; DoRA's magnitude = the frozen column norms).

MoRA and MokA have no PEFT type: `save` refuses them. No torch here: the runtime does not need it.
"""

import json
import math
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from mora_jax.adapters import common
from mora_jax.adapters.dora import DoRAConfig, DoRALinear
from mora_jax.adapters.lora import LoRAConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_RESAVE = "Save the adapter again with PEFT's save_pretrained (or eval.py --export_peft)."
_KEY = re.compile(r"base_model\.model\.(vision|text)_model\.encoder\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\."
                  r"(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)")
# adapter_config.json settings that change what the adapter computes and that our LoRA/DoRA do not have.
_UNSUPPORTED = {"bias": "none", "lora_bias": False, "fan_in_fan_out": False, "modules_to_save": None,
                "layer_replication": None, "rank_pattern": {}, "alpha_pattern": {}, "use_qalora": False,
                "target_parameters": None, "trainable_token_indices": None, "alora_invocation_tokens": None,
                "arrow_config": None}


def module_path(target: common.Target) -> str:
  """The Hugging Face (and PEFT) module path of an adapted projection."""
  block = "self_attn" if target.name in common.ATTENTION_TARGETS else "mlp"
  return f"{target.tower}_model.encoder.layers.{target.layer}.{block}.{target.name}"


def _no_peft_type(adapter) -> str:
  """Why `adapter` (a config that is not LoRA or DoRA, or None) has no PEFT export, and what to use instead."""
  if adapter is None:
    return ("the linear probe has no adapter to export to PEFT; eval.py --export_hf writes its (frozen) CLIP weights "
            "and head.")
  what = f"{type(adapter).__name__} ({adapter.name}) has no PEFT type (PEFT knows LoRA and DoRA)"
  if adapter.mergeable:
    return (f"{what}. Export the merged model instead: eval.py --workdir <run> --export_hf <dir> writes Hugging Face "
            "CLIP weights with the adapter folded in.")
  return (f"{what}, and its update depends on the input, so it cannot be merged into CLIP weights either "
          "(--export_hf refuses it too); evaluate it from its checkpoint with eval.py.")


def check_exportable(cfg) -> None:
  """Refuses an adapter config that has no PEFT type, saying what to export instead."""
  if not isinstance(cfg, (LoRAConfig, DoRAConfig)):
    raise ValueError(_no_peft_type(cfg))


def to_peft(clf) -> tuple[dict[str, np.ndarray], dict]:
  """A LoRA or DoRA classifier's adapters as PEFT's (tensors, adapter_config.json contents)."""
  cfg = clf.adapter
  check_exportable(cfg)
  tensors, modules = {}, []
  for target in common.targets(clf.backbone, cfg):
    adapted, path = getattr(target.parent, target.name), module_path(target)
    modules.append(path)
    tensors[f"{PREFIX}{path}.lora_A.weight"] = np.asarray(adapted.lora_A.get_value(), np.float32).T
    tensors[f"{PREFIX}{path}.lora_B.weight"] = np.asarray(adapted.lora_B.get_value(), np.float32).T
    if isinstance(adapted, DoRALinear):
      tensors[f"{PREFIX}{path}.lora_magnitude_vector"] = np.asarray(adapted.magnitude.get_value(), np.float32)
  config = {"peft_type": "LORA", "task_type": None, "r": cfg.rank, "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout, "use_dora": isinstance(cfg, DoRAConfig), "use_rslora": False,
            # Full module paths: PEFT matches a list entry against the whole name, so exactly these are adapted.
            "target_modules": modules, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
            "inference_mode": True, "base_model_name_or_path": None}
  return {k: np.ascontiguousarray(v) for k, v in tensors.items()}, config


def save(clf, out_dir: str | Path, base_model: str | None = None) -> Path:
  """Writes `clf`'s LoRA/DoRA adapters as a PEFT adapter directory for a transformers CLIPModel whose
  weights are `clf`'s backbone (`base_model`: its name or path, recorded in the config)."""
  tensors, config = to_peft(clf)
  config["base_model_name_or_path"] = base_model
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  safetensors.numpy.save_file(tensors, out / WEIGHTS_FILE)
  (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
  return out


def is_peft_dir(path: str | Path) -> bool:
  return (Path(path) / CONFIG_FILE).is_file()


def _read(directory: Path) -> tuple[dict, dict[str, np.ndarray]]:
  config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
  for path in (config_path, weights_path):
    if not path.is_file():
      raise FileNotFoundError(f"{path} not found: a PEFT adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE} "
                              "(as PeftModel.save_pretrained writes).")
  try:
    config = json.loads(config_path.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{config_path} does not read as JSON ({e}): cut short or damaged? {_RESAVE}") from e
  try:
    tensors = safetensors.numpy.load_file(str(weights_path))
  except safetensors.SafetensorError as e:
    raise ValueError(f"{weights_path} does not read as safetensors ({e}): cut short or damaged? {_RESAVE}") from e
  return config, tensors


def _modules(tensors: dict[str, np.ndarray], where: Path) -> dict[tuple[str, int, str], dict[str, np.ndarray]]:
  """{(tower, layer, projection): {"lora_A.weight": ..., ...}} of a PEFT file; any other key is an error."""
  modules: dict = {}
  for key, value in tensors.items():
    match = _KEY.fullmatch(key)
    if match is None or match[4] not in common.ATTENTION_TARGETS + common.MLP_TARGETS:
      raise ValueError(f"{where}: key {key!r} is not a LoRA/DoRA tensor of a CLIPModel projection; mora_jax adapts "
                       f"{common.ATTENTION_TARGETS + common.MLP_TARGETS} of the vision and text encoder layers only "
                       f"(keys like {PREFIX}vision_model.encoder.layers.0.self_attn.q_proj.lora_A.weight).")
    modules.setdefault((match[1], int(match[2]), match[4]), {})[match[5]] = value
  return modules


def read_config(peft_dir: str | Path) -> LoRAConfig | DoRAConfig:
  """The smallest LoRAConfig / DoRAConfig (same targets in every layer from start_layer on) that covers every
  projection a PEFT adapter directory adapts."""
  directory = Path(peft_dir)
  config, tensors = _read(directory)
  where = directory / CONFIG_FILE
  if config.get("peft_type") != "LORA":
    raise ValueError(f"{where}: peft_type {config.get('peft_type')!r}; mora_jax imports LORA (LoRA and DoRA) only.")
  different = {k: config[k] for k, v in _UNSUPPORTED.items() if config.get(k, v) not in (v, None, {}, False)}
  if different:
    raise ValueError(f"{where}: {different} change what the adapter computes in ways mora_jax's LoRA/DoRA do not "
                     f"(they need {({k: _UNSUPPORTED[k] for k in different})}).")
  modules = _modules(tensors, directory / WEIGHTS_FILE)
  if not modules:
    raise ValueError(f"{directory / WEIGHTS_FILE} holds no LoRA tensors.")
  rank = int(config["r"])
  # rsLoRA's scale lora_alpha / sqrt(r) is our alpha / r with alpha = lora_alpha * sqrt(r).
  alpha = float(config["lora_alpha"]) * (math.sqrt(rank) if config.get("use_rslora") else 1.0)
  order = common.ATTENTION_TARGETS + common.MLP_TARGETS
  cls = DoRAConfig if config.get("use_dora") else LoRAConfig
  return cls(targets=tuple(t for t in order if any(name == t for _, _, name in modules)),
             towers=tuple(t for t in common.TOWERS if any(tower == t for tower, _, _ in modules)),
             start_layer=min(layer for _, layer, _ in modules), rank=rank, alpha=alpha,
             dropout=float(config.get("lora_dropout", 0.0)))


def load_into(clf, peft_dir: str | Path) -> None:
  """Sets `clf`'s LoRA/DoRA parameters (in place) from a PEFT adapter directory. `clf.adapter` must be of the
  same method, rank and scale as the file and adapt every projection it holds (see `read_config`)."""
  directory = Path(peft_dir)
  theirs, ours = read_config(directory), clf.adapter
  if not isinstance(ours, (LoRAConfig, DoRAConfig)) or type(ours) is not type(theirs) or ours.rank != theirs.rank \
      or not math.isclose(ours.alpha, theirs.alpha, rel_tol=1e-6):
    raise ValueError(f"{directory} holds a {theirs.name} adapter of rank {theirs.rank}, scale "
                     f"{theirs.alpha / theirs.rank:g}; this model's adapter is {_describe(ours)}. Use adapter "
                     f"method {theirs.name!r}, rank {theirs.rank}, alpha {theirs.alpha:g}.")
  modules = _modules(_read(directory)[1], directory / WEIGHTS_FILE)
  adapted = {(t.tower, t.layer, t.name): t for t in common.targets(clf.backbone, ours)}
  missing = sorted(set(modules) - set(adapted))
  if missing:
    raise ValueError(f"{directory} adapts {[f'{tower}.layers.{layer}.{name}' for tower, layer, name in missing]}, "
                     f"which this model's adapter ({_describe(ours)}) does not; use targets {theirs.targets}, "
                     f"towers {theirs.towers}, start_layer <= {theirs.start_layer}.")
  for key, values in modules.items():
    module = getattr(adapted[key].parent, adapted[key].name)
    names = {"lora_A.weight": (module.lora_A, True), "lora_B.weight": (module.lora_B, True)}
    if isinstance(module, DoRALinear):
      names["lora_magnitude_vector"] = (module.magnitude, False)
    if set(values) != set(names):
      raise ValueError(f"{directory / WEIGHTS_FILE}: {module_path(adapted[key])} has {sorted(values)}; "
                       f"a {ours.name} projection needs {sorted(names)}.")
    for name, (variable, transposed) in names.items():
      value = values[name].T if transposed else values[name]
      expected = variable.get_value().shape[::-1] if transposed else variable.get_value().shape
      if values[name].shape != expected:
        raise ValueError(f"{directory / WEIGHTS_FILE}: {PREFIX}{module_path(adapted[key])}.{name} has shape "
                         f"{values[name].shape}; this model's projection needs {expected} (is it the same "
                         "CLIP architecture?).")
      variable.set_value(jnp.asarray(value, variable.get_value().dtype))


def _describe(cfg) -> str:
  if cfg is None:
    return "none (the linear probe)"
  return (f"{cfg.name}, rank {cfg.rank}, scale {cfg.alpha / cfg.rank:g}" if isinstance(cfg, (LoRAConfig, DoRAConfig))
          else cfg.name) + f", targets {cfg.targets}, towers {cfg.towers}, start_layer {cfg.start_layer}"
