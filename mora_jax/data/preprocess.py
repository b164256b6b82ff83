"""Image preprocessing with the semantics of transformers' CLIPImageProcessor (its PIL backend is the
reference), driven by a checkpoint's preprocessor_config.json: RGB conversion, resize (shorter side, or to an
exact size), centre crop, rescale, per-channel normalisation. Output is float32 [3, height, width], as
CLIPModel expects; `image_to_array` stops before the rescale (uint8, what the pipeline sends to the devices,
which normalise through `normalize_table`).

Transparency: the authors call PIL's `convert("RGB")` before the processor, which drops alpha; transformers
composites transparent images onto white. "drop" (default) follows the authors, "white" transformers.

Bit depth: convert("RGB") clips pixels wider than 8 bits to 255; a 16-bit image is rescaled to 8 bits first, and
32-bit integer and float images are refused (`eight_bit`).
"""

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TRANSPARENCY = ("drop", "white")
# Pixel modes wider than 16 bits, which `eight_bit` refuses: what each holds.
WIDE_MODES = {"I": "32-bit integer pixels (mode I, as PIL reads 32-bit TIFFs and 16-bit PGM files)",
              "F": "float pixels (mode F)"}


@dataclasses.dataclass(frozen=True)
class ImageProcessing:
  """CLIPImageProcessor's image fields; the defaults are OpenAI CLIP's at 224 pixels."""
  size: int | tuple[int, int] = 224  # int: the shorter side (aspect kept); (height, width): exactly that
  crop_size: tuple[int, int] = (224, 224)  # (height, width)
  resample: int = Image.Resampling.BICUBIC
  rescale_factor: float = 1 / 255
  mean: tuple[float, ...] = CLIP_MEAN
  std: tuple[float, ...] = CLIP_STD
  do_resize: bool = True
  do_center_crop: bool = True
  do_rescale: bool = True
  do_normalize: bool = True

  @classmethod
  def clip(cls, image_size: int) -> "ImageProcessing":
    """OpenAI CLIP's preprocessing for a vision tower of `image_size` pixels."""
    return cls(size=image_size, crop_size=(image_size, image_size))

  @property
  def output_size(self) -> tuple[int, int] | None:
    """(height, width) of every output, or None where it follows each image's size."""
    if self.do_center_crop:
      return self.crop_size
    if self.do_resize and isinstance(self.size, tuple):
      return self.size
    return None


def _square(value, key: str, path: Path) -> tuple[int, int]:
  if isinstance(value, int):
    return value, value
  if isinstance(value, dict) and set(value) == {"height", "width"}:
    return int(value["height"]), int(value["width"])
  raise ValueError(f"{path}: {key}={value!r} is not supported; use an integer or {{\"height\", \"width\"}}.")


def read_image_processing(path: str | Path) -> ImageProcessing:
  """A checkpoint's preprocessor_config.json -> ImageProcessing; keys it leaves out keep CLIP's defaults."""
  path = Path(path)
  try:
    fields = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: unreadable preprocessor config ({e}); fix or delete it (CLIP's defaults are "
                     "then used).") from e
  default = ImageProcessing()
  size = fields.get("size") or default.size
  if isinstance(size, dict) and set(size) == {"shortest_edge"}:
    size = int(size["shortest_edge"])
  elif not isinstance(size, int):
    size = _square(size, "size", path)
  resample = fields.get("resample", default.resample)
  if resample not in {int(r) for r in Image.Resampling}:
    raise ValueError(f"{path}: resample={resample!r} is not a PIL resampling filter "
                     f"({', '.join(f'{int(r)}={r.name}' for r in Image.Resampling)}).")
  return ImageProcessing(
      size=size, crop_size=_square(fields.get("crop_size") or default.crop_size[0], "crop_size", path),
      resample=int(resample), rescale_factor=float(fields.get("rescale_factor", default.rescale_factor)),
      mean=tuple(map(float, fields.get("image_mean", default.mean))),
      std=tuple(map(float, fields.get("image_std", default.std))),
      **{flag: bool(fields.get(flag, True)) for flag in ("do_resize", "do_center_crop", "do_rescale",
                                                        "do_normalize")})


def to_preprocessor_config(processing: ImageProcessing) -> dict:
  """The inverse of `read_image_processing`: a preprocessor_config.json with which transformers'
  CLIPImageProcessor (and CLIPProcessor) preprocess images as `image_to_pixels` does."""
  size = ({"height": processing.size[0], "width": processing.size[1]} if isinstance(processing.size, tuple)
          else {"shortest_edge": processing.size})
  return {"image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor",
          "do_convert_rgb": True, "do_resize": processing.do_resize, "size": size,
          "resample": int(processing.resample), "do_center_crop": processing.do_center_crop,
          "crop_size": {"height": processing.crop_size[0], "width": processing.crop_size[1]},
          "do_rescale": processing.do_rescale, "rescale_factor": processing.rescale_factor,
          "do_normalize": processing.do_normalize, "image_mean": list(processing.mean),
          "image_std": list(processing.std)}


def eight_bit(image: Image.Image) -> Image.Image:
  """`image` with pixels of 8 bits whose values mean what the file's mean. PIL's convert("RGB") clips wider pixels
  to 0..255, which turns a 16-bit image (0..65535) nearly all white: 16-bit ones are rescaled by their range
  (value / 257, rounded). 32-bit integer and float pixels (modes I and F) have no range to rescale by (stretching
  each image over its own minimum and maximum would give one value another meaning in every image): refused."""
  if image.mode.startswith("I;16"):
    pixels = np.asarray(image).astype(np.uint32)
    return Image.fromarray(((pixels + 128) // 257).astype(np.uint8))
  if image.mode in WIDE_MODES:
    raise ValueError(f"{WIDE_MODES[image.mode]}, which have no fixed range to map to 8 bits; save it as an 8- or "
                     "16-bit PNG or TIFF of the range you mean")
  return image


def to_rgb(image: Image.Image, transparency: str = "drop") -> Image.Image:
  """RGB. With "white", images with an alpha band or palette transparency are composited onto white first;
  with "drop", alpha is discarded as PIL's convert("RGB") does. Wider pixels are made 8-bit first (`eight_bit`)."""
  if transparency not in TRANSPARENCY:
    raise ValueError(f"transparency={transparency!r}: use one of {TRANSPARENCY}.")
  image = eight_bit(image)
  if image.mode == "RGB":
    return image
  if transparency == "white" and ("A" in image.getbands() or image.info.get("transparency") is not None):
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
  return image.convert("RGB")


def resized_size(width: int, height: int, shortest_edge: int) -> tuple[int, int]:
  """(width, height) with the shorter side = shortest_edge and the longer one truncated, as transformers."""
  if width <= height:
    return shortest_edge, int(shortest_edge * height / width)
  return int(shortest_edge * width / height), shortest_edge


def center_crop(array: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
  """[H, W, C] -> [crop_height, crop_width, C], centred as transformers does, zero-padded if smaller."""
  h, w = array.shape[:2]
  if h < crop_height or w < crop_width:
    padded = np.zeros((max(h, crop_height), max(w, crop_width), array.shape[2]), array.dtype)
    top, left = (padded.shape[0] - h) // 2, (padded.shape[1] - w) // 2
    padded[top:top + h, left:left + w] = array
    array, h, w = padded, padded.shape[0], padded.shape[1]
  top, left = (h - crop_height) // 2, (w - crop_width) // 2
  return array[top:top + crop_height, left:left + crop_width]


def image_to_array(image: Image.Image, processing: ImageProcessing = ImageProcessing(),
                   transparency: str = "drop") -> np.ndarray:
  """A PIL image -> uint8 [height, width, 3]: RGB, resized and cropped, not yet rescaled or normalised."""
  image = to_rgb(image, transparency)
  if processing.do_resize:
    if isinstance(processing.size, tuple):
      height, width = processing.size
      target = (width, height)
    else:
      target = resized_size(*image.size, processing.size)
    image = image.resize(target, processing.resample)
  array = np.asarray(image)
  if processing.do_center_crop:
    array = center_crop(array, *processing.crop_size)
  return array


def normalize(array: np.ndarray, processing: ImageProcessing = ImageProcessing()) -> np.ndarray:
  """uint8 [height, width, 3] -> float32 [3, height, width]: rescaled and normalised per channel."""
  pixels = array.astype(np.float32)
  if processing.do_rescale:
    pixels = (array.astype(np.float64) * processing.rescale_factor).astype(np.float32)
  if processing.do_normalize:
    pixels = (pixels - np.asarray(processing.mean, np.float32)) / np.asarray(processing.std, np.float32)
  return pixels.transpose(2, 0, 1)


def normalize_table(processing: ImageProcessing = ImageProcessing()) -> np.ndarray:
  """float32 [3, 256]: `normalize` of every uint8 value in each channel. Normalisation is per value and
  channel, so looking a uint8 image up in this table equals `normalize` bit for bit (what the devices do)."""
  values = np.repeat(np.arange(256, dtype=np.uint8)[:, None, None], 3, axis=2)  # [256, 1, 3]
  return normalize(values, processing)[:, :, 0]


def image_to_pixels(image: Image.Image, processing: ImageProcessing = ImageProcessing(),
                    transparency: str = "drop") -> np.ndarray:
  """A PIL image -> float32 [3, height, width]."""
  return normalize(image_to_array(image, processing, transparency), processing)


def decode_image(data: bytes, source: str) -> Image.Image:
  """Decodes encoded image bytes fully (so truncation is caught here) into 8-bit pixels (`eight_bit`, so that the
  check of a dataset's images refuses the pixels it cannot use), naming `source` on failure."""
  stream = io.BytesIO(data)
  try:
    image = Image.open(stream)
    image.load()
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    # PIL names the stream it read ("cannot identify image file <_io.BytesIO object at 0x...>"); `source` is the file.
    raise ValueError(f"{source}: corrupt or truncated image ({str(e).replace(f' {stream!r}', '')}).") from e
  try:
    return eight_bit(image)
  except ValueError as e:
    raise ValueError(f"{source}: {e}.") from e


def decode_to_array(image, name: str, processing: ImageProcessing, transparency: str) -> np.ndarray | str:
  """One image (encoded bytes, or an array) -> `image_to_array`'s uint8 pixels, or the error message of a corrupt
  one (returned, not raised, so that it crosses from a worker process as data)."""
  try:
    if isinstance(image, (bytes, bytearray)):
      image = decode_image(bytes(image), name)
    else:
      image = Image.fromarray(np.asarray(image))
    return image_to_array(image, processing, transparency)
  except ValueError as e:
    return str(e)


def decode_chunk(chunk: list, processing: ImageProcessing, transparency: str) -> list:
  """`decode_to_array` of each (image, name) of `chunk` (what a decoding worker process runs)."""
  return [decode_to_array(image, name, processing, transparency) for image, name in chunk]


def white_image(height: int = 224, width: int = 224) -> Image.Image:
  """MoRA's dummy input for a missing image: all-255 pixels through the normal preprocessing."""
  return Image.new("RGB", (width, height), (255, 255, 255))
