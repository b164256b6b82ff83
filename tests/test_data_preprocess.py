"""Image preprocessing equals transformers' CLIPImageProcessor (PIL backend) on several sizes and modes, after the
authors' convert("RGB") by default; preprocessor_config.json drives it."""

import io
import json
import re

import ml_collections
import numpy as np
import pytest
from PIL import Image

from mora_jax import backbones, clip
from mora_jax.data import image_check, preprocess, tokenizers
from mora_jax.models import hf
from tests import helpers

# Both run the same uint8 PIL resize and the same float64 rescale and float32 normalisation: equal bits.
TOLERANCE = 0.0
TRANSPARENT = ("rgba", "la", "palette-png")


def images():
  rng = np.random.RandomState(0)
  rgb = lambda h, w: Image.fromarray(rng.randint(0, 256, (h, w, 3), np.uint8))
  rgba = Image.fromarray(rng.randint(0, 256, (150, 200, 4), np.uint8), "RGBA")
  la = Image.fromarray(rng.randint(0, 256, (120, 90, 2), np.uint8), "LA")
  gray = Image.fromarray(rng.randint(0, 256, (300, 120), np.uint8), "L")
  cmyk_buffer = io.BytesIO()
  Image.fromarray(rng.randint(0, 256, (240, 260, 4), np.uint8), "CMYK").save(cmyk_buffer, "JPEG")
  cmyk = Image.open(io.BytesIO(cmyk_buffer.getvalue()))
  palette_buffer = io.BytesIO()
  palette = rgb(90, 64).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
  palette.save(palette_buffer, "PNG", transparency=3)
  palette = Image.open(io.BytesIO(palette_buffer.getvalue()))
  return {"rgb-landscape": rgb(240, 320), "rgb-portrait": rgb(500, 333), "rgb-small": rgb(100, 150),
          "rgb-exact": rgb(224, 224), "rgba": rgba, "la": la, "gray": gray, "cmyk-jpeg": cmyk, "palette-png": palette}


def processor_class():
  pytest.importorskip("transformers")
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # pylint: disable=import-outside-toplevel
  return CLIPImageProcessorPil


@pytest.fixture(name="reference", scope="module")
def fixture_reference():
  return processor_class()()


def reference_pixels(reference, image) -> np.ndarray:
  return reference(images=image, return_tensors="np")["pixel_values"][0]


def authors_rgb(image: Image.Image) -> Image.Image:
  """The authors' `convert("RGB")` as transformers 4 then saw it. PIL keeps a palette's transparency colour in
  the converted image's `info`, which transformers 5 (not 4) composites onto white; the pixels alone are what
  the authors' processor received."""
  return Image.fromarray(np.asarray(image.convert("RGB")))


@pytest.mark.parametrize("name", list(images()))
def test_matches_the_authors_convert_rgb_then_clip_image_processor(name, reference):
  image = images()[name]
  expected = reference_pixels(reference, authors_rgb(image))
  ours = preprocess.image_to_pixels(image)
  assert ours.shape == expected.shape == (3, 224, 224) and ours.dtype == np.float32
  assert np.abs(ours - expected).max() <= TOLERANCE, name


@pytest.mark.parametrize("name", TRANSPARENT)
def test_white_transparency_matches_clip_image_processor_compositing(name, reference):
  image = images()[name]
  white = preprocess.image_to_pixels(image, transparency="white")
  assert np.abs(white - reference_pixels(reference, image)).max() <= TOLERANCE, name
  # The two options really differ on these images (up to a few units after normalisation).
  assert np.abs(white - preprocess.image_to_pixels(image)).max() > 0.5, name


def test_modes_are_really_different():
  modes = {name: image.mode for name, image in images().items()}
  assert {"RGB", "RGBA", "LA", "L", "CMYK", "P"} <= set(modes.values())
  assert images()["palette-png"].info.get("transparency") is not None


PROCESSOR_CONFIGS = {
    "other-mean-std-bilinear": dict(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                                    image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3], resample=2),
    "exact-resize-no-crop-no-normalise": dict(size={"height": 36, "width": 28}, do_center_crop=False,
                                              rescale_factor=1 / 127.5, do_normalize=False, resample=0),
    "no-resize-crop-only": dict(do_resize=False, crop_size={"height": 64, "width": 48}),
}


@pytest.mark.parametrize("variant", list(PROCESSOR_CONFIGS))
def test_preprocessor_config_drives_preprocessing(variant, tmp_path):
  processor_class()(**PROCESSOR_CONFIGS[variant]).save_pretrained(str(tmp_path))
  reference = processor_class().from_pretrained(str(tmp_path))
  processing = preprocess.read_image_processing(tmp_path / hf.PREPROCESSOR_FILE)
  assert processing != preprocess.ImageProcessing()
  for name, image in images().items():
    rgb = authors_rgb(image)
    ours = preprocess.image_to_pixels(rgb, processing)
    expected = reference_pixels(reference, rgb)
    assert ours.shape == expected.shape and ours.shape[1:] == processing.output_size, name
    assert np.abs(ours - expected).max() <= TOLERANCE, (variant, name)


@pytest.mark.parametrize("variant", list(PROCESSOR_CONFIGS))
def test_a_written_preprocessor_config_makes_transformers_preprocess_as_we_do(variant, tmp_path):
  processor_class()(**PROCESSOR_CONFIGS[variant]).save_pretrained(str(tmp_path / "source"))
  processing = preprocess.read_image_processing(tmp_path / "source" / hf.PREPROCESSOR_FILE)
  (tmp_path / hf.PREPROCESSOR_FILE).write_text(json.dumps(preprocess.to_preprocessor_config(processing)))
  assert preprocess.read_image_processing(tmp_path / hf.PREPROCESSOR_FILE) == processing
  reference = processor_class().from_pretrained(str(tmp_path))
  for name, image in images().items():
    rgb = authors_rgb(image)
    assert np.abs(preprocess.image_to_pixels(rgb, processing) - reference_pixels(reference, rgb)).max() <= TOLERANCE


def test_legacy_integer_sizes_and_missing_keys(tmp_path):
  path = tmp_path / hf.PREPROCESSOR_FILE
  path.write_text(json.dumps({"size": 40, "crop_size": 32, "image_mean": [0.5, 0.5, 0.5]}))
  assert preprocess.read_image_processing(path) == preprocess.ImageProcessing(
      size=40, crop_size=(32, 32), mean=(0.5, 0.5, 0.5))


@pytest.mark.parametrize("fields, message", [
    ({"size": {"shortest_edge": 224, "longest_edge": 300}}, "size=.*is not supported"),
    ({"resample": 9}, "resample=9 is not a PIL resampling filter"),
])
def test_unsupported_preprocessor_config_names_file_and_key(fields, message, tmp_path):
  path = tmp_path / hf.PREPROCESSOR_FILE
  path.write_text(json.dumps(fields))
  with pytest.raises(ValueError, match=f"{path}: {message}"):
    preprocess.read_image_processing(path)


@pytest.fixture(name="checkpoint_dir")
def fixture_checkpoint_dir(tmp_path):
  """A tiny random CLIP checkpoint (32-pixel vision tower) with a tokenizer, as save_pretrained lays it out."""
  directory = clip.save_pretrained(clip.init(helpers.tiny_config(), seed=0), tmp_path / "ckpt")
  tokenizers.byte_level_clip_tokenizer(directory)
  return directory


def load_backbone(directory, log=print):
  cfg = ml_collections.ConfigDict(dict(path=str(directory), random_preset="", seed=0, dtype="float32",
                                       cache_dir=""))
  return backbones.load(cfg, 16, directory.parent, mesh=None, rules=(), log=log)


def test_backbone_reads_its_checkpoints_preprocessor_config(checkpoint_dir):
  processor_class()(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, image_mean=[0.5, 0.4, 0.3],
                    image_std=[0.2, 0.25, 0.3]).save_pretrained(str(checkpoint_dir))
  loaded = load_backbone(checkpoint_dir).image_processing
  assert loaded == preprocess.ImageProcessing(size=36, crop_size=(32, 32), mean=(0.5, 0.4, 0.3),
                                              std=(0.2, 0.25, 0.3))


def test_backbone_without_preprocessor_config_says_it_uses_clips_defaults(checkpoint_dir):
  lines = []
  assert load_backbone(checkpoint_dir, lines.append).image_processing == preprocess.ImageProcessing.clip(32)
  assert any(f"{checkpoint_dir} has no preprocessor_config.json" in line for line in lines)


def test_backbone_refuses_a_crop_other_than_its_vision_tower(checkpoint_dir):
  processor_class()(crop_size={"height": 224, "width": 224}).save_pretrained(str(checkpoint_dir))
  with pytest.raises(ValueError, match=r"preprocessor_config.json makes images of \(224, 224\).*takes 32x32"):
    load_backbone(checkpoint_dir)


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


def encoded(image: Image.Image, format_name: str) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format_name)
  return buffer.getvalue()


def test_a_16_bit_image_is_rescaled_by_its_range_not_clipped():
  ramp = np.arange(65536, dtype=np.uint32).reshape(256, 256).astype(np.uint16)  # 0..65535
  png = encoded(Image.fromarray(ramp), "PNG")
  assert Image.open(io.BytesIO(png)).mode == "I;16"
  expected = np.repeat(np.round(ramp / 257).astype(np.uint8)[..., None], 3, axis=2)  # 65535 / 257 = 255
  as_is = preprocess.ImageProcessing(do_resize=False, do_center_crop=False)
  for image in (preprocess.decode_image(png, "ramp.png"), Image.open(io.BytesIO(png))):  # decoded, or given as PIL
    np.testing.assert_array_equal(preprocess.image_to_array(image, as_is), expected)


@pytest.mark.parametrize("mode, holds", [("I", "32-bit integer pixels (mode I"), ("F", "float pixels (mode F)")],
                         ids=["I", "F"])
def test_images_of_wider_pixels_are_refused_when_checked(mode, holds):
  tiff = encoded(Image.new(mode, (8, 8), 1), "TIFF")
  with pytest.raises(ValueError, match=re.escape(f"wide.tiff: {holds}") + ".*no fixed range.*8- or 16-bit"):
    preprocess.decode_image(tiff, "wide.tiff")
  assert image_check.corrupt_files([{"image": tiff, "file": "wide.tiff"}], "m/train") == ["wide.tiff"]
