"""easy-VQA prompts for the multimodal LLM: the template's token layout and the masks MokA reads."""

import numpy as np
import pytest
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from mora_jax.data import missing as missing_lib
from mora_jax.data import vqa


@pytest.fixture(scope="module")
def tokenizer():
  bpe = tokenizers.Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  texts = ["question: what color is the shape? answer: red", "question: is there a circle? answer: yes",
           "a red circle"]
  bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>",
                                              eos_token="</s>")


def split(codes) -> vqa.VQASplit:
  n = len(codes)
  return vqa.VQASplit(name="t", questions=("what color is the shape?", "is there a circle?", "what color is it?")[:n],
                      labels=np.array([0, 1, 0][:n]), question_type=np.array([1, 0, 1][:n]),
                      image_index=np.array([0, 1, 1][:n]), images=(b"", b""), table=np.asarray(codes, np.int8),
                      answer_names=("red", "yes"), type_names=("yes/no", "color", "shape"), image_set="t")


def test_layout_prompt_left_padded_answer_right_padded_keys_never_answers(tokenizer):
  layout = vqa.Layout(prompt_length=16, answer_length=4)
  batch = vqa.Assemble(split([0, 0]), tokenizer, layout, with_answers=True)(np.array([0, 1]))
  p = layout.prompt_length
  for i, (question, answer) in enumerate([("what color is the shape?", "red"), ("is there a circle?", "yes")]):
    ids = batch["input_ids"][i]
    prompt_ids = ids[batch["prompt"][i]]
    assert tokenizer.decode(prompt_ids) == vqa.prompt(question)
    assert tokenizer.decode(ids[batch["answer"][i]]) == f" {answer}</s>"
    # Prompt tokens end exactly where the answer starts; padding on the prompt's left and the answer's right.
    assert batch["prompt"][i, p - 1] and not batch["prompt"][i, p:].any() and not batch["answer"][i, :p].any()
    assert not batch["text_valid"][i, 0]
  assert not (batch["prompt"] & batch["answer"]).any()
  assert (batch["text_valid"] == (batch["prompt"] | batch["answer"])).all()


def test_missing_question_keeps_the_template_and_missing_image_has_no_image(tokenizer):
  codes = [missing_lib.COMPLETE, missing_lib.TEXT_MISSING, missing_lib.IMAGE_MISSING]
  batch = vqa.Assemble(split(codes), tokenizer, vqa.Layout(), with_answers=False)(np.array([0, 1, 2, -1]))
  assert tokenizer.decode(batch["input_ids"][1][batch["prompt"][1]]) == vqa.prompt("")
  np.testing.assert_array_equal(batch["image"], [0, 1, -1, 0])
  np.testing.assert_array_equal(batch["valid"], [True, True, True, False])
  assert batch["input_ids"].shape[1] == vqa.Layout().prompt_length and not batch["answer"].any()


def test_too_long_prompt_is_an_error_naming_the_layout(tokenizer):
  with pytest.raises(ValueError, match="layout.prompt_length=4"):
    vqa.encode_texts(tokenizer, [vqa.prompt("what color is the shape?")], None, vqa.Layout(prompt_length=4))


def test_scenarios_and_captions():
  s = split([0, 1, 2])
  assert (s.scenario("image_missing").table == missing_lib.IMAGE_MISSING).all()
  assert s.scenario("mix") is s
  with pytest.raises(ValueError, match="scenario"):
    s.scenario("both")


def test_attribute_questions_ask_each_image_what_its_pairs_say_it_has():
  """Stage 1's "questions" data: per image a colour and a shape question with the answer its question/answer
  pairs imply (negations included), complete; an image whose pairs name neither attribute is left out, as
  from the captions."""
  names = ("red", "blue", "circle", "triangle", "yes", "no")
  s = vqa.VQASplit(name="t", questions=("what color is the shape?", "is there not a circle?", "is there a triangle?",
                                        "is there a blue shape?"),
                   labels=np.array([0, 5, 4, 5]), question_type=np.array([1, 0, 0, 0]),
                   image_index=np.array([0, 0, 1, 2]), images=(b"", b"", b""),
                   table=np.array([2, 1, 0, 0], np.int8), answer_names=names, type_names=("yes/no", "color", "shape"),
                   image_set="t")
  questions = s.attribute_questions()
  colour, shape = vqa.ATTRIBUTE_QUESTIONS["colour"], vqa.ATTRIBUTE_QUESTIONS["shape"]
  assert [(questions.questions[i], questions.answer(i), int(questions.image_index[i])) for i in range(len(questions))] \
      == [(colour, "red", 0), (shape, "circle", 0), (shape, "triangle", 1)]
  np.testing.assert_array_equal(questions.question_type, [1, 2, 2])
  assert questions.has_prompt and (questions.table == missing_lib.COMPLETE).all()
  assert questions.images is s.images and questions.image_set == s.image_set
  captions = s.captions()
  assert list(captions.targets) == ["a red circle", "a triangle"] and list(captions.image_index) == [0, 1]
