"""CLIP architecture configs, presets, and their Hugging Face `config.json` form."""

import dataclasses
from typing import Any

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  pad_token_id: int = 1
  bos_token_id: int = 49406
  eos_token_id: int = 49407


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  text: TextConfig = TextConfig()
  vision: VisionConfig = VisionConfig()
  projection_dim: int = 512
  logit_scale_init_value: float = 2.6592

  def __post_init__(self):
    for name, tower in (("text", self.text), ("vision", self.vision)):
      if tower.hidden_act not in ACTIVATIONS:
        raise ValueError(f"{name} hidden_act={tower.hidden_act!r} is not supported; use one of {ACTIVATIONS}.")
      if tower.hidden_size % tower.num_attention_heads:
        raise ValueError(f"{name} hidden_size {tower.hidden_size} is not divisible by "
                         f"num_attention_heads {tower.num_attention_heads}.")
    if self.vision.image_size % self.vision.patch_size:
      raise ValueError(f"vision image_size {self.vision.image_size} is not a multiple of "
                       f"patch_size {self.vision.patch_size}.")

  def to_hf_dict(self) -> dict[str, Any]:
    """The `config.json` content that `transformers.CLIPConfig` reads."""
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": self.projection_dim,
        "logit_scale_init_value": self.logit_scale_init_value,
        "text_config": {"model_type": "clip_text_model", "projection_dim": self.projection_dim,
                        **dataclasses.asdict(self.text)},
        "vision_config": {"model_type": "clip_vision_model", "projection_dim": self.projection_dim,
                          **dataclasses.asdict(self.vision)},
    }

  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any]) -> "CLIPConfig":
    """Reads a Hugging Face CLIP `config.json` dict; fields we do not model (dropout, init) are ignored."""
    if hf.get("model_type", "clip") != "clip":
      raise ValueError(f"model_type is {hf.get('model_type')!r}, expected 'clip' (a transformers CLIPModel config).")

    def pick(sub: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
      return {k: default if sub.get(k) is None else type(default)(sub[k]) for k, default in defaults.items()}

    # The dataclass defaults are Hugging Face's, so a field missing from config.json means the same thing.
    return cls(text=TextConfig(**pick(hf.get("text_config") or {}, dataclasses.asdict(TextConfig()))),
               vision=VisionConfig(**pick(hf.get("vision_config") or {}, dataclasses.asdict(VisionConfig()))),
               **pick(hf, {"projection_dim": cls.projection_dim,
                           "logit_scale_init_value": cls.logit_scale_init_value}))


_TEXT_512 = TextConfig()
_TEXT_768 = TextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12)
_VISION_B = VisionConfig()
_VISION_L = VisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                         num_attention_heads=16, patch_size=14)

# The architectures of OpenAI's released CLIP checkpoints (openai/clip-vit-*) and a tiny one for tests.
PRESETS: dict[str, CLIPConfig] = {
    "ViT-B/32": CLIPConfig(text=_TEXT_512, vision=_VISION_B, projection_dim=512),
    "ViT-B/16": CLIPConfig(text=_TEXT_512, vision=dataclasses.replace(_VISION_B, patch_size=16),
                           projection_dim=512),
    "ViT-L/14": CLIPConfig(text=_TEXT_768, vision=_VISION_L, projection_dim=768),
    "ViT-L/14-336": CLIPConfig(text=_TEXT_768, vision=dataclasses.replace(_VISION_L, image_size=336),
                               projection_dim=768),
    "tiny": CLIPConfig(
        text=TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=16, pad_token_id=1,
                        bos_token_id=126, eos_token_id=127),
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, image_size=32, patch_size=8),
        projection_dim=16),
}


def preset(name: str) -> CLIPConfig:
  if name not in PRESETS:
    raise KeyError(f"Unknown CLIP preset {name!r}; known presets: {sorted(PRESETS)}.")
  return PRESETS[name]
