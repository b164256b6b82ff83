"""Image preprocessing equals transformers' CLIPImageProcessor (PIL backend) on several sizes and modes."""

import io

import numpy as np
import pytest
from PIL import Image

from mora_jax.data import preprocess

TOLERANCE = 1e-5  # the bound; both run the same uint8 PIL pipeline, and the measured difference is 0


def images():
  rng = np.random.RandomState(0)
  rgb = lambda h, w: Image.fromarray(rng.randint(0, 256, (h, w, 3), np.uint8))
  rgba = Image.fromarray(rng.randint(0, 256, (150, 200, 4), np.uint8), "RGBA")
  gray = Image.fromarray(rng.randint(0, 256, (300, 120), np.uint8), "L")
  cmyk_buffer = io.BytesIO()
  Image.fromarray(rng.randint(0, 256, (240, 260, 4), np.uint8), "CMYK").save(cmyk_buffer, "JPEG")
  cmyk = Image.open(io.BytesIO(cmyk_buffer.getvalue()))
  palette_buffer = io.BytesIO()
  palette = rgb(90, 64).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
  palette.save(palette_buffer, "PNG", transparency=3)
  palette = Image.open(io.BytesIO(palette_buffer.getvalue()))
  return {"rgb-landscape": rgb(240, 320), "rgb-portrait": rgb(500, 333), "rgb-small": rgb(100, 150),
          "rgb-exact": rgb(224, 224), "rgba": rgba, "gray": gray, "cmyk-jpeg": cmyk, "palette-png": palette}


@pytest.fixture(name="reference", scope="module")
def fixture_reference():
  transformers = pytest.importorskip("transformers")
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # pylint: disable=import-outside-toplevel
  del transformers
  return CLIPImageProcessorPil()


@pytest.mark.parametrize("name", list(images()))
def test_matches_clip_image_processor(name, reference):
  image = images()[name]
  expected = reference(images=image, return_tensors="np")["pixel_values"][0]
  ours = preprocess.image_to_pixels(image)
  assert ours.shape == expected.shape == (3, 224, 224) and ours.dtype == np.float32
  assert np.abs(ours - expected).max() <= TOLERANCE, name


def test_modes_are_really_different():
  modes = {name: image.mode for name, image in images().items()}
  assert {"RGB", "RGBA", "L", "CMYK", "P"} <= set(modes.values())


def test_white_image_is_constant_per_channel():
  pixels = preprocess.image_to_pixels(preprocess.white_image())
  expected = (1.0 - np.asarray(preprocess.CLIP_MEAN)) / np.asarray(preprocess.CLIP_STD)
  np.testing.assert_allclose(pixels[:, 0, 0], expected, rtol=1e-6)
  assert np.ptp(pixels, axis=(1, 2)).max() == 0


def test_truncated_image_names_its_source():
  buffer = io.BytesIO()
  Image.new("RGB", (64, 64), (10, 20, 30)).save(buffer, "JPEG")
  with pytest.raises(ValueError, match="sample 17 \\(img/17.jpg\\): corrupt or truncated image"):
    preprocess.decode_image(buffer.getvalue()[:100], "sample 17 (img/17.jpg)")
