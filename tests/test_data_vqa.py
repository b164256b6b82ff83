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


def test_match_questions_name_each_image_with_one_attribute_changed_for_no():
  """The matching task: per image with both attributes known and per wording, a yes question naming its own
  colour and shape and a no question with exactly one of them changed (its type says which); the same questions
  on every call; an image with an unknown attribute is left out."""
  names = ("red", "blue", "green", "circle", "triangle", "rectangle", "yes", "no")
  s = vqa.VQASplit(name="t", questions=("what color is the shape?", "what shape is in the image?",
                                        "what color is the shape?", "is there a blue shape?", "is there a circle?"),
                   labels=np.array([0, 3, 1, 6, 6]), question_type=np.array([1, 2, 1, 0, 0]),
                   image_index=np.array([0, 0, 1, 2, 2]), images=(b"", b"", b""),
                   table=np.array([2, 1, 0, 0, 0], np.int8), answer_names=names,
                   type_names=("yes/no", "color", "shape"), image_set="t")
  match = s.match_questions()
  assert match.type_names == vqa.MATCH_TYPES and match.images is s.images and match.image_set == s.image_set
  assert (match.table == missing_lib.COMPLETE).all() and len(match) == 2 * 2 * len(vqa.MATCH_TEMPLATES)
  own = {0: ("red", "circle"), 2: ("blue", "circle")}  # image 1's shape is unknown
  for i in range(len(match)):
    image, kind = int(match.image_index[i]), vqa.MATCH_TYPES[match.question_type[i]]
    named = [(c, sh) for template in vqa.MATCH_TEMPLATES for c in names[:3] for sh in names[3:6]
             if template.format(colour=c, shape=sh) == match.questions[i]]
    assert len(named) == 1
    (colour, shape), (own_colour, own_shape) = named[0], own[image]
    assert match.answer(i) == ("yes" if kind == "same colour and shape" else "no")
    assert (colour != own_colour, shape != own_shape) == {"same colour and shape": (False, False),
                                                          "other colour": (True, False),
                                                          "other shape": (False, True)}[kind]
  again = s.match_questions()
  assert again.questions == match.questions and (again.question_type == match.question_type).all()


def test_match_questions_of_easy_vqa_are_not_answered_by_the_question_or_the_image_alone(easy_vqa_data):
  """On easy-VQA's splits: every image has as many yes as no (the image alone is at chance), and the question's
  majority answer on train scores near chance on test (the question alone is too); the missing tables are the
  matching task's own (dataset easy_vqa_match), of its length."""
  none = missing_lib.Missing(rate=0.0)
  train, test = (vqa.load(name, easy_vqa_data, none, log=lambda _: None, questions="match")
                 for name in ("train", "test"))
  yes = train.answer_names.index("yes")
  for split in (train, test):
    asked = np.bincount(split.image_index) > 0
    yes_count = np.bincount(split.image_index, weights=split.labels == yes)
    assert np.all(yes_count[asked] / np.bincount(split.image_index)[asked] == 0.5)
  majority = {q: np.mean(train.labels[np.asarray(train.questions) == q] == yes) >= 0.5 for q in set(train.questions)}
  question_only = np.mean([majority[q] == (label == yes) for q, label in zip(test.questions, test.labels)])
  assert 0.45 < question_only < 0.56, question_only
  table = np.load(easy_vqa_data / "missing_tables" / missing_lib.generated_table_name("easy_vqa_match", "test", none))
  assert len(table) == len(test)
  with pytest.raises(ValueError, match="questions 'count': use one of"):
    vqa.load("test", easy_vqa_data, none, questions="count")
