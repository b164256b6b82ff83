"""Image preprocessing with the semantics of transformers' CLIPImageProcessor (its PIL backend is the
reference): RGB (transparency composited on white), shortest side resized bicubic, centre crop, [0, 1]
scaling, per-channel normalisation. Output is float32 NCHW-ready [3, crop, crop], as CLIPModel expects.
"""

import io

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb(image: Image.Image) -> Image.Image:
  """RGB; images with an alpha band or palette transparency are composited onto white first."""
  if image.mode == "RGB":
    return image
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
  return image.convert("RGB")


def resized_size(width: int, height: int, shortest_edge: int) -> tuple[int, int]:
  """(width, height) with the shorter side = shortest_edge and the longer one truncated, as transformers."""
  if width <= height:
    return shortest_edge, int(shortest_edge * height / width)
  return int(shortest_edge * width / height), shortest_edge


def center_crop(array: np.ndarray, crop: int) -> np.ndarray:
  """[H, W, C] -> [crop, crop, C]: top-left at ((H - crop) // 2, (W - crop) // 2), zero-padded if smaller."""
  h, w = array.shape[:2]
  if h < crop or w < crop:
    padded = np.zeros((max(h, crop), max(w, crop), array.shape[2]), array.dtype)
    top, left = (padded.shape[0] - h) // 2, (padded.shape[1] - w) // 2
    padded[top:top + h, left:left + w] = array
    array, h, w = padded, padded.shape[0], padded.shape[1]
  top, left = (h - crop) // 2, (w - crop) // 2
  return array[top:top + crop, left:left + crop]


def image_to_pixels(image: Image.Image, size: int = 224, crop_size: int = 224, mean=CLIP_MEAN,
                    std=CLIP_STD) -> np.ndarray:
  """A PIL image -> float32 [3, crop_size, crop_size]."""
  image = to_rgb(image)
  image = image.resize(resized_size(*image.size, size), Image.Resampling.BICUBIC)
  array = center_crop(np.asarray(image), crop_size)
  scaled = (array.astype(np.float64) * (1 / 255)).astype(np.float32)
  normalised = (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  return normalised.transpose(2, 0, 1)


def decode_image(data: bytes, source: str) -> Image.Image:
  """Decodes encoded image bytes fully (so truncation is caught here), naming `source` on failure."""
  try:
    image = Image.open(io.BytesIO(data))
    image.load()
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f"{source}: corrupt or truncated image ({e}).") from e
  return image


def white_image(size: int = 224) -> Image.Image:
  """MoRA's dummy input for a missing image: all-255 pixels through the normal preprocessing."""
  return Image.new("RGB", (size, size), (255, 255, 255))
