"""Public CLIP API, mirroring Hugging Face's:

    from mora_jax import clip
    model = clip.from_pretrained("openai/clip-vit-base-patch16")  # or a local directory
    img = model.get_image_features(pixel_values)                   # float32 [B, 3, H, W] (NCHW)
    txt = model.get_text_features(input_ids, attention_mask)       # int [B, L]
    clip.save_pretrained(model, "out/")                            # loads in transformers.CLIPModel
"""

from mora_jax.models.modeling import CLIP, TowerOutput, count_params, init
from mora_jax.models.config import PRESETS, CLIPConfig, TextConfig, VisionConfig, preset
from mora_jax.models.hf import WeightsError, from_pretrained, save_pretrained

__all__ = [
    "CLIP", "CLIPConfig", "PRESETS", "TextConfig", "TowerOutput", "VisionConfig", "WeightsError",
    "count_params", "from_pretrained", "init", "preset", "save_pretrained",
]
