"""backbones.load of a CLIP checkpoint directory: a folder missing files, or whose tokenizer cannot be the model's
(transformers builds a 2-token one from a folder without vocabulary), is refused in one line naming the folder and
the fix, before the weights are read."""

import ml_collections
import pytest

from mora_jax import backbones, clip
from mora_jax.data import tokenizers
from tests import helpers


@pytest.fixture(name="checkpoint_dir")
def fixture_checkpoint_dir(tmp_path):
  """A tiny random CLIP's config.json and model.safetensors, no tokenizer."""
  return clip.save_pretrained(clip.init(helpers.tiny_config(), seed=0), tmp_path / "ckpt")


def load_backbone(directory):
  cfg = ml_collections.ConfigDict(dict(path=str(directory), random_preset="", seed=0, dtype="float32",
                                       cache_dir=""))
  return backbones.load(cfg, 16, directory.parent, mesh=None, rules=(), log=lambda _: None)


def test_a_folder_without_tokenizer_files_is_refused_before_the_weights_are_read(checkpoint_dir):
  (checkpoint_dir / "model.safetensors").write_bytes(b"unreadable: the refusal must come before the weights")
  with pytest.raises(FileNotFoundError) as refused:
    load_backbone(checkpoint_dir)
  message = str(refused.value)
  assert message.startswith(f"{checkpoint_dir} is an incomplete checkpoint: it lacks tokenizer files "
                            "(tokenizer.json or vocab.json + merges.txt). Copy them") and "\n" not in message


def test_a_folder_without_config_and_weights_names_both(tmp_path):
  (tmp_path / "tokenizer.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match=r"lacks config\.json; model\.safetensors or "
                                              r"model\.safetensors\.index\.json or pytorch_model\.bin\. "):
    load_backbone(tmp_path)


def test_a_tokenizer_far_smaller_than_the_vocabulary_is_refused(checkpoint_dir):
  (checkpoint_dir / "vocab.json").write_text("{}")
  (checkpoint_dir / "merges.txt").write_text("#version: 0.2\n")
  with pytest.raises(ValueError, match=r"ckpt: its tokenizer has 2 tokens but the model's vocab_size in "
                                       r"config\.json is 128: the tokenizer files are damaged"):
    load_backbone(checkpoint_dir)


def test_the_embedded_backbone_is_loadable_from_its_folder_not_its_name(checkpoint_dir, monkeypatch):
  """What a PEFT export names as its base model: the folder transformers can load, not "embedded"."""
  tokenizers.byte_level_clip_tokenizer(checkpoint_dir.parent / "tokenizer").save_pretrained(checkpoint_dir)
  monkeypatch.setattr(backbones.embedded, "ensure", lambda *args, **kwargs: checkpoint_dir)
  cfg = ml_collections.ConfigDict(dict(path="embedded", random_preset="", seed=0, dtype="float32", cache_dir=""))
  backbone = backbones.load(cfg, 16, checkpoint_dir.parent, mesh=None, rules=(), log=lambda _: None)
  assert backbone.identity["source"] == "embedded" and backbone.loadable == str(checkpoint_dir)
  assert load_backbone(checkpoint_dir).loadable == str(checkpoint_dir)


def test_a_folder_without_a_preprocessor_config_warns_and_says_what_to_add(tmp_path):
  logged = []
  processing = backbones.backbone.image_processing(tmp_path, 64, log=logged.append)
  assert processing.output_size == (64, 64)
  assert len(logged) == 1 and logged[0].startswith(f"warning: {tmp_path} has no preprocessor_config.json: ")
  assert "add the preprocessor_config.json of its image processor" in logged[0]
