"""The multimodal-LLM loop end to end on tiny models (a random tiny CLIP and a random small Llama with the
embedded LM's tokenizer): both stages, checkpoints, resume, eval.json, and eval.py on the workdir."""

import json

import numpy as np
import pytest
from flax import nnx

from mora_jax.backbones import embedded_lm
from mora_jax.data import missing as missing_lib
from mora_jax.data import vqa
from mora_jax.models import config, llama, llama_hf, modeling
from mora_jax.models import mllm as mllm_lib
from mora_jax.train import cli, mllm


@pytest.fixture(scope="module")
def setup_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("mllm")
  data_dir = root / "data"
  train = vqa.load("train", data_dir, missing_lib.Missing(rate=0.0))
  lm_dir = root / "lm"
  tokenizer = embedded_lm.train_tokenizer(embedded_lm.pretraining_texts(train), lm_dir, 384)
  config = llama.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
  llama_hf.save_pretrained(llama.init(config), lm_dir)
  return root, data_dir, lm_dir


def overrides(data_dir, lm_dir, **extra) -> list[str]:
  values = {"data_dir": data_dir, "lm.path": lm_dir, "backbone.path": "", "backbone.random_preset": "tiny",
            "stage1.steps": 2, "max_steps": 3, "eval.validation_samples": 32, "eval.test_samples": 32,
            "eval.batch_size": 32, "batch_size": 8, "log_every_steps": 1, **extra}
  return [f"--config.{k}={v}" for k, v in values.items()]


def test_train_resume_and_eval(setup_dirs):
  root, data_dir, lm_dir = setup_dirs
  workdir = root / "run"
  argv = ["--config", "configs/easy_vqa_mllm_moka.py", "--workdir", str(workdir)]
  assert cli.train_main(argv + overrides(data_dir, lm_dir, max_steps=2)) == 0
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
  # Resumes at step 2 (max_steps may change between runs) and trains one more step.
  assert cli.train_main(argv + overrides(data_dir, lm_dir)) == 0
  results = json.loads((workdir / "eval.json").read_text())
  assert results["task"] == "mllm" and results["method"] == "moka" and results["checkpoint_step"] in (2, 3)
  assert set(results["test"]) == {"complete", "text_missing", "image_missing", "mix"}
  for scenario in results["test"].values():
    assert scenario["samples"] == 32 and 0.0 <= scenario["exact_match"] <= 1.0
    assert set(scenario["per_question_type"]) <= {"yes/no", "color", "shape"}
  steps = [r["step"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
           if r["kind"] == "stage2/train"]
  assert steps == [1, 2, 3]
  assert cli.eval_main(["--workdir", str(workdir)]) == 0
  again = json.loads((workdir / "eval-both-0.7.json").read_text())
  assert again["checkpoint_step"] == results["checkpoint_step"] and again["test"] == results["test"]


def test_answer_loss_reads_answer_tokens_only():
  """Row s's token is predicted by row s - 1: only the logits of the rows before answer tokens count."""
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 50, (2, 6))
  answer = np.zeros((2, 6), bool)
  answer[:, 4:] = True
  seq = mllm_lib.Sequence(embeds=None, valid=np.ones((2, 6), bool), call=None, ids=ids, answer=answer)
  logits = rng.normal(size=(2, 6, 50)).astype(np.float32)
  loss, count = mllm_lib.answer_loss(logits, seq)
  assert count == 4
  changed = logits.copy()
  changed[:, 5] += 5.0
  changed[:, :3] += 5.0
  np.testing.assert_allclose(mllm_lib.answer_loss(changed, seq)[0], loss, rtol=1e-6)
  changed[:, 3] += rng.normal(size=50).astype(np.float32)
  assert abs(float(mllm_lib.answer_loss(changed, seq)[0]) - float(loss)) > 1e-3


def test_sequence_puts_padding_first_and_keys_on_prompt_tokens():
  """Two samples: with image (3 patches) and without; text = 2 prompt slots (1 padding) + 2 answer slots."""
  lm = llama.init(llama.LlamaConfig(vocab_size=20, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, bos_token_id=1))
  vision = modeling.VisionTransformer(config.preset("tiny").vision, dtype=np.float32, rngs=nnx.Rngs(0))
  model = mllm_lib.MLLM(vision, lm, "linear", rngs=nnx.Rngs(0))
  batch = mllm_lib.Batch(features=np.ones((2, 3, 32), np.float32), image_present=np.array([True, False]),
                         input_ids=np.array([[0, 7, 8, 2]] * 2), text_valid=np.array([[False, True, True, True]] * 2),
                         prompt=np.array([[False, True, False, False]] * 2),
                         answer=np.array([[False, False, True, True]] * 2))
  seq = model.sequence(batch)
  np.testing.assert_array_equal(seq.valid, [[0, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1]])
  np.testing.assert_array_equal(seq.ids[:, -4:], [[0, 7, 8, 2], [1, 7, 8, 2]])
  np.testing.assert_array_equal(seq.ids[0, :5], [0, 1, 0, 0, 0])  # padding, <s>, three image rows
  np.testing.assert_array_equal(seq.call.modality[0], [0, 0, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(seq.call.key_mask, [[0, 0, 0, 0, 0, 1, 0, 0]] * 2)
  np.testing.assert_array_equal(seq.answer, [[0, 0, 0, 0, 0, 0, 1, 1]] * 2)


def test_projector_kinds():
  for kind, layers in (("linear", 1), ("mlp2x_gelu", 2)):
    projector = mllm_lib.Projector(kind, 8, 16, rngs=nnx.Rngs(0))
    assert len(projector.kernels) == layers and projector(np.ones((2, 3, 8))).shape == (2, 3, 16)
  with pytest.raises(ValueError, match="projector='conv'"):
    mllm_lib.Projector("conv", 8, 16, rngs=nnx.Rngs(0))
