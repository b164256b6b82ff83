"""The embedded LM: a (shortened) build from easy-VQA train text, its Hugging Face directory (transformers loads
it with our logits, <= 1e-4 in float32, the parity bound of tests/test_models_llama.py), and reuse of the cache."""

import json

import numpy as np
import pytest
import transformers

from mora_jax.backbones import embedded_lm
from mora_jax.data import missing as missing_lib
from mora_jax.data import vqa
from mora_jax.models import llama, llama_hf

STEPS = 40  # of the shipped 300: enough for the loss to fall by more than half


@pytest.fixture(scope="module")
def built(tmp_path_factory, easy_vqa_data):
  root = tmp_path_factory.mktemp("embedded_lm")
  data_dir = easy_vqa_data
  directory = embedded_lm.build(root / "cache" / embedded_lm.directory_name(0), data_dir, recipe=dict(steps=STEPS))
  return root, data_dir, directory


def test_build_writes_a_hugging_face_directory_and_ensure_reuses_it(built):
  root, data_dir, directory = built
  assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "pretraining.json"} <= {
      p.name for p in directory.iterdir()}
  assert not list(directory.parent.glob("*.partial-*"))
  report = json.loads((directory / "pretraining.json").read_text())
  assert report["losses"][-1] < 0.5 * report["losses"][0]
  logged = []
  assert embedded_lm.ensure(root / "cache", data_dir, seed=0, log=logged.append) == directory and not logged


def test_transformers_loads_it_with_our_logits_and_tokens(built):
  torch = pytest.importorskip("torch")
  _, data_dir, directory = built
  ours, tokenizer = embedded_lm.load(directory)
  theirs = transformers.LlamaForCausalLM.from_pretrained(str(directory), attn_implementation="eager").eval()
  assert type(transformers.AutoTokenizer.from_pretrained(str(directory))) is type(tokenizer)
  test = vqa.load("test", data_dir, missing_lib.Missing(rate=0.0))
  texts = embedded_lm.pretraining_texts(test)[:8]
  assert [tokenizer.decode(tokenizer.encode(t, add_special_tokens=False)) for t in texts] == texts
  ids, mask = embedded_lm.encode(tokenizer, texts, embedded_lm.MAX_LENGTH)
  with torch.no_grad():
    expected = theirs(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long)).logits
  got = np.asarray(ours(ids, mask)[0])
  valid = mask.astype(bool)
  np.testing.assert_allclose(got[valid], expected.numpy()[valid], atol=1e-4, rtol=0)


@pytest.fixture(name="lm_dir")
def fixture_lm_dir(tmp_path):
  """A tiny random Llama's config.json (a 600-token vocabulary) and model.safetensors, no tokenizer."""
  config = llama.LlamaConfig(vocab_size=600, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2)
  return llama_hf.save_pretrained(llama.init(config), tmp_path / "lm")


def test_a_folder_without_tokenizer_files_is_refused_in_one_line(lm_dir):
  with pytest.raises(FileNotFoundError) as refused:
    embedded_lm.load(lm_dir)
  message = str(refused.value)
  assert message.startswith(f"{lm_dir} is an incomplete checkpoint: it lacks tokenizer files (tokenizer.json or "
                            "vocab.json + merges.txt or tokenizer.model). Copy them") and "\n" not in message


def test_a_tokenizer_far_smaller_than_the_vocabulary_is_refused(lm_dir):
  tokenizer = embedded_lm.train_tokenizer(["a red circle"], lm_dir, vocab_size=280)
  with pytest.raises(ValueError, match=rf"lm: its tokenizer has {len(tokenizer)} tokens but the model's vocab_size "
                                       r"in config\.json is 600"):
    embedded_lm.load(lm_dir)


def test_answer_tokens_take_the_answer_weight_and_a_changed_recipe_its_own_folder(tmp_path):
  texts = ["a red circle question: what color is the shape? answer: red", "question: is it blue? answer: no",
           "a red circle"]
  tokenizer = embedded_lm.train_tokenizer(texts, tmp_path, vocab_size=280)
  ids, mask = embedded_lm.encode(tokenizer, texts, 64)  # a tokenizer of 3 texts merges little
  weights = embedded_lm.loss_weights(tokenizer, ids, mask, 5.0)
  for row, text in enumerate(texts):
    tokens = [tokenizer.decode([t]) for t in ids[row][mask[row] > 0]]
    answer = len(tokenizer.encode(text.split(" answer:")[1], add_special_tokens=False)) + 1 if "answer:" in text \
        else 0  # its tokens and </s>
    expected = [1.0] * (len(tokens) - answer) + [5.0] * answer
    assert weights[row][mask[row] > 0].tolist() == expected, tokens
  assert not weights[mask == 0].any()
  np.testing.assert_array_equal(embedded_lm.loss_weights(tokenizer, ids, mask, 1.0), mask)  # the recipe's default
  assert embedded_lm.directory_name(0, dict(embedded_lm.RECIPE)) == embedded_lm.directory_name(0) == \
      f"easy_vqa_llama-v{embedded_lm.VERSION}-seed0"
  assert embedded_lm.directory_name(0, {"answer_weight": 5.0}).startswith(embedded_lm.directory_name(0) + "-")
