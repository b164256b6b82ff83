"""The multimodal-LLM loop end to end on tiny models (a random tiny CLIP and a random small Llama with the
embedded LM's tokenizer): both stages, checkpoints, resume, eval.json, and eval.py on the workdir."""

import json

import pytest

from mora_jax.backbones import embedded_lm
from mora_jax.data import missing as missing_lib
from mora_jax.data import vqa
from mora_jax.models import llama, llama_hf
from mora_jax.train import cli


@pytest.fixture(scope="module")
def setup_dirs(tmp_path_factory, easy_vqa_data):
  root = tmp_path_factory.mktemp("mllm")
  data_dir = easy_vqa_data
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
