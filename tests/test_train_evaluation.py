"""Evaluation of finished runs: re-tests, export, restores of the trained parameters alone."""

import json
import re
import types
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mora_jax import adapters, data
from mora_jax.train import checkpoint, cli, config as config_lib, evaluation, export as export_lib
from mora_jax.train import job as job_lib, loop
from tests.helpers import (ROOT, memes_config, memes_overrides, run_script, saved_checkpoint, saved_test_results,
                           train_losses)

EXPORT_FILES = {"config.json", "model.safetensors", "head.safetensors", "head.json", "README.md",
                "preprocessor_config.json", "tokenizer_config.json"}


def memes_samples(memes, count=4) -> tuple[list[Image.Image], list[str]]:
  """The first `count` raw test memes: PIL images and texts."""
  rows = [json.loads(line) for line in (memes / "raw" / "test.jsonl").read_text().splitlines()[:count]]
  return [Image.open(memes / "raw" / row["img"]) for row in rows], [row["text"] for row in rows]


def our_logits(workdir: Path, step: int, images, texts) -> np.ndarray:
  """The run's classifier (unmerged, float32) at checkpoint `step`, through our own preprocessing."""
  config = config_lib.from_json((workdir / job_lib.CONFIG_FILE).read_text())
  job = job_lib.build_job(config)
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", read_only=True)
  _, params = ckpt.restore_first_intact_params([step], evaluation.abstract_params(job), print)
  ckpt.close()
  clf = adapters.join(job.graphdef, {"backbone": job.params["backbone"], **params})
  ids, mask = data.tokenize(job.backbone.tokenizer, texts, job.prep)
  pixels = np.stack([job.prep.pixels(image) for image in images])
  return np.asarray(clf(jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask)))


def model_card_logits(export: Path, images, texts) -> np.ndarray:
  """Runs the model card's snippet (transformers and torch alone) on the samples."""
  card = (export / export_lib.CARD_FILE).read_text()
  code = card.split(export_lib.SNIPPET_START, 1)[1].split("```", 1)[0]
  namespace = {}
  exec(compile(code, str(export / export_lib.CARD_FILE), "exec"), namespace)  # pylint: disable=exec-used
  return namespace["logits"](images, texts).numpy()


def test_eval_reproduces_the_test_numbers_and_exports_for_transformers(one_device_run):
  out, export = one_device_run / "again.json", one_device_run / "hf"
  run_script("eval.py", ["--workdir", one_device_run, "--output", out, "--export_hf", export])
  assert json.loads(out.read_text())["test"] == saved_test_results(one_device_run)
  assert EXPORT_FILES <= {p.name for p in export.iterdir()}
  assert "| complete |" in (export / export_lib.CARD_FILE).read_text()
  transformers = pytest.importorskip("transformers")
  assert transformers.CLIPTokenizer.from_pretrained(export)("a meme")["input_ids"][-1] == 515  # byte-level EOS


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_export_without_test_classifies_in_pytorch_as_we_do(memes, one_device_run, head, capsys):
  pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  if head == "linear":
    workdir = one_device_run
  else:
    workdir = memes / "mlp_head"
    loop.train(memes_config(memes, {"max_steps": 2, "head.type": "mlp"}), workdir)
  step = checkpoint.Checkpointer(workdir / "checkpoints", read_only=True).latest_step()
  export = workdir / f"hf_{head}"
  capsys.readouterr()
  assert cli.eval_main(["--checkpoint", str(workdir / "checkpoints" / str(step)), "--export_hf", str(export),
                        "--no_test"]) == 0
  printed = capsys.readouterr()
  assert "evaluating" not in printed.out + printed.err and not list(workdir.glob("eval-*.json"))
  assert EXPORT_FILES <= {p.name for p in export.iterdir()}
  assert "Not tested" in (export / export_lib.CARD_FILE).read_text()
  info = json.loads((export / export_lib.HEAD_INFO_FILE).read_text())
  assert info["head"] == head and info["class_names"] and info["multi_label"] is False
  # Our preprocessing, as transformers' processors read it from the export.
  processor = transformers.CLIPProcessor.from_pretrained(export)
  assert transformers.CLIPImageProcessor.from_pretrained(export).crop_size == processor.image_processor.crop_size
  images, texts = memes_samples(memes)
  ours, theirs = our_logits(workdir, step, images, texts), model_card_logits(export, images, texts)
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


def test_checkpoint_from_8_devices_evaluates_the_same_on_2(eight_device_run):
  out = eight_device_run / "on2.json"
  run_script("eval.py", ["--workdir", eight_device_run, "--output", out], devices=2)
  assert json.loads(out.read_text())["test"] == saved_test_results(eight_device_run)


def test_moka_trains_and_is_tested_unmerged_and_reproducibly(memes, one_device_run):
  config = config_lib.load(ROOT / "configs" / "hateful_memes_moka.py")
  config_lib.apply_overrides(config, [tuple(flag[len("--config."):].split("=", 1)) for flag in
                                      memes_overrides(memes, max_steps=2, **{"head.type": "mlp"})])
  workdir = memes / "moka"
  results = loop.train(config, workdir)
  assert results["method"] == "moka" and results["merged"] is False
  assert all(np.isfinite(loss) for loss in train_losses(workdir))
  again = evaluation.evaluate_run(workdir)
  assert again["merged"] is False and again["test"] == results["test"]
  with pytest.raises(ValueError, match="cannot be exported with --export_hf"):
    evaluation.evaluate_run(workdir, export_hf=memes / "moka_hf", test=False)
  assert not (memes / "moka_hf").exists()


def test_a_run_with_a_frozen_head_re_evaluates_from_its_parameters_alone(memes):
  workdir = memes / "frozen_head"
  # lr multiplier 0: the head has no AdamW moments in the saved optimizer state, unlike every other partition.
  results = loop.train(memes_config(memes, {"max_steps": 2, "optim.lr_mults.head": 0}), workdir)
  again = evaluation.evaluate_run(workdir)
  assert again["checkpoint_step"] == results["checkpoint_step"] and again["test"] == results["test"]


@pytest.mark.parametrize("multi_label", [False, True])
def test_the_model_cards_code_is_valid_python_and_its_prediction_runs(tmp_path, multi_label):
  """The card's usage line ran as a SyntaxError for multi-label heads (a comment inside the print call); every
  code block now compiles, and its prediction evaluates on logits of the head's shape."""
  torch = pytest.importorskip("torch")
  config = config_lib.from_json(config_lib.to_json(cli.default_config()))
  job = types.SimpleNamespace(config=config, class_names=("cat", "dog", "bird"), multi_label=multi_label,
                              backbone=types.SimpleNamespace(identity={"source": "embedded"}))
  card = export_lib.card(job, tmp_path, tested=None)
  blocks = [block.split("```", 1)[0] for block in card.split("```python\n")[1:]]
  assert len(blocks) == 2
  for block in blocks:
    compile(block, "README.md", "exec")
  printed = blocks[1].rsplit("print(", 1)[1].rsplit(")", 1)[0]
  scores = torch.tensor([[2.0, -3.0, 0.5]])
  expected = ["cat", "bird"] if multi_label else "cat"
  names = {"torch": torch, "info": {"class_names": job.class_names}, "scores": scores}
  assert eval(printed, names) == expected  # pylint: disable=eval-used


@pytest.mark.parametrize("written, warning", [
    (None, None),  # no config.json
    ('{"adapter": {"rank": 4}, "seed": 0}', None),
    ('{"adapter": {"rank": 8}, "seed": 0, "bogus": 1}',
     "differs from the config saved with the checkpoints (saved -> config.json) in: adapter.rank: 4 -> 8; bogus: "
     "'<absent>' -> 1. Evaluation uses the saved one, which the model was trained with;"),
    ("", "is cut short or not a JSON object (Expecting value: line 1 column 1 (char 0)); evaluation does not need it"),
], ids=["absent", "as saved", "edited", "cut short"])
def test_a_config_json_other_than_the_checkpoints_config_is_a_warning_naming_the_keys(tmp_path, written, warning):
  path = tmp_path / job_lib.CONFIG_FILE
  if written is not None:
    path.write_text(written)
  line = evaluation.config_file_warning({"config": {"adapter": {"rank": 4}, "seed": 0}}, path)
  assert line == warning if warning is None else line.startswith(f"warning: {path} {warning}"), line


def test_a_manifest_whose_classes_changed_is_refused_naming_both_lists(tmp_path):
  (tmp_path / "a.png").write_bytes(b"")  # found, not decoded
  rows = [{"image": "a.png", "text": "", "label": label, "split": split}
          for split in ("train", "validation", "test") for label in ("cat", "dog", "bird")]
  (tmp_path / "m.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
  manifest = data.Manifest(str(tmp_path / "m.jsonl"))
  evaluation.check_classes({"class_names": ["bird", "cat", "dog"]}, manifest, tmp_path)  # unchanged
  evaluation.check_classes({}, manifest, tmp_path)  # a checkpoint from before meta recorded them
  with pytest.raises(checkpoint.IncompatibleCheckpoint, match=re.escape(
      f"{tmp_path} holds a head trained on the classes ['cat', 'dog'], but the manifest {tmp_path / 'm.jsonl'} now "
      "gives ['bird', 'cat', 'dog']: its classes changed since. Restore the labels")):
    evaluation.check_classes({"class_names": ["cat", "dog"]}, manifest, tmp_path)


def test_no_intact_checkpoint_to_evaluate_is_one_error_that_leaves_the_run_alone(tmp_path):
  meta = saved_checkpoint(tmp_path / "checkpoints") / "meta" / "metadata"
  meta.write_text(meta.read_text()[:5])
  with pytest.raises(checkpoint.NoIntactCheckpoint) as error:
    evaluation.evaluate_run(tmp_path)
  assert str(error.value).startswith(f"no checkpoint in {tmp_path / 'checkpoints'} restores (step 1: ")
  assert "Nothing was moved (they are only read here): restore the damaged files" in str(error.value)
  assert "afresh" not in str(error.value)
