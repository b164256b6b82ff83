"""How well the frozen embedded LM answers easy-VQA questions from the image's true caption given as text: the
ceiling of what image tokens that stand for the caption could give it, per question type, before any adapter.

    python bench/mllm_lm_reads_captions.py                                # the default embedded LM
    python bench/mllm_lm_reads_captions.py --recipe steps=1600 answer_weight=5
    python bench/mllm_lm_reads_captions.py --questions match        # the matching task's questions

Builds the LM of the recipe on first use (`embedded_lm.ensure`, in --cache_dir; its folder is printed, for
`--config.lm.path`), then generates greedy answers for the first --samples validation questions whose image has a
caption, once with the prompt alone and once with the caption before it, as the LM saw them in pre-training.
"""

import argparse
import ast
import collections

import jax.numpy as jnp
import numpy as np

from mora_jax import data
from mora_jax.backbones import embedded_lm
from mora_jax.data import vqa
from mora_jax.models import llama


def answers(lm, tokenizer, texts: list[str], batch_size: int = 256) -> list[str]:
  """Greedy answers (3 new tokens at most) to `texts`, each read after <s>, left-padded."""
  out = []
  for start in range(0, len(texts), batch_size):
    encoded = [[tokenizer.bos_token_id, *tokenizer.encode(t, add_special_tokens=False)]
               for t in texts[start:start + batch_size]]
    length = max(map(len, encoded))
    ids = np.array([[tokenizer.pad_token_id] * (length - len(e)) + e for e in encoded], np.int32)
    tokens = llama.generate(lm, jnp.asarray(ids), jnp.asarray((ids != tokenizer.pad_token_id).astype(np.int32)),
                            max_new_tokens=3, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    out += [a.strip() for a in tokenizer.batch_decode(np.asarray(tokens), skip_special_tokens=True)]
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--recipe", nargs="*", default=[], metavar="KEY=VALUE",
                      help=f"values of the LM's pre-training recipe to change: {embedded_lm.RECIPE}")
  parser.add_argument("--questions", default="easy_vqa", choices=vqa.QUESTIONS,
                      help="easy-VQA's own questions or the matching task's (config.questions)")
  parser.add_argument("--samples", type=int, default=1000)
  parser.add_argument("--data_dir", default="data")
  parser.add_argument("--cache_dir", default="~/.cache/mora_jax")
  args = parser.parse_args()
  recipe = {k: ast.literal_eval(v) for k, v in (item.split("=", 1) for item in args.recipe)}
  unknown = sorted(set(recipe) - set(embedded_lm.RECIPE))
  if unknown:
    parser.error(f"unknown recipe keys {unknown}; known: {sorted(embedded_lm.RECIPE)}")
  directory = embedded_lm.ensure(args.cache_dir, args.data_dir, recipe=recipe)
  lm, tokenizer = embedded_lm.load(directory)
  no_missing = data.Missing(rate=0.0)
  split = vqa.load("validation", args.data_dir, no_missing, log=lambda _: None, questions=args.questions)
  # The captions of easy-VQA's own pairs: the matching task's images are theirs.
  captions = vqa.load("validation", args.data_dir, no_missing, log=lambda _: None).captions()
  caption_of = dict(zip(captions.image_index.tolist(), captions.targets))
  rows = [i for i in range(len(split)) if int(split.image_index[i]) in caption_of][:args.samples]
  print(f"LM {directory} (recipe {({**embedded_lm.RECIPE, **recipe})}); {len(rows)} validation questions")
  print("| given | " + " | ".join(split.type_names) + " | all |")
  print("|---|" + "---:|" * (len(split.type_names) + 1))
  for given in ("question", "caption + question"):
    prefix = {i: caption_of[int(split.image_index[i])] + " " if given != "question" else "" for i in rows}
    got = answers(lm, tokenizer, [prefix[i] + vqa.prompt(split.questions[i]) for i in rows])
    hits, totals = collections.Counter(), collections.Counter()
    for i, answer in zip(rows, got):
      kind = split.type_names[int(split.question_type[i])]
      totals[kind] += 1
      hits[kind] += answer == split.answer(i)
    print(f"| {given} | " + " | ".join(f"{100 * hits[k] / max(totals[k], 1):.1f}" for k in split.type_names)
          + f" | {100 * sum(hits.values()) / len(rows):.1f} |")


if __name__ == "__main__":
  main()
