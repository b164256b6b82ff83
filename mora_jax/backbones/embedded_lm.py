"""The embedded language model of the multimodal-LLM setting: a small Llama-style decoder pre-trained by this
project on easy-VQA's training text (questions with their answers, and image captions derived from them), with a
byte-level BPE tokenizer trained on the same text, saved as a Hugging Face directory that transformers'
`LlamaForCausalLM` and `AutoTokenizer` load.

Like the embedded CLIP (embedded.py), it is built once per cache directory on first use and nothing is
downloaded; the test split is never read. Deterministic given the seed.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tokenizers
import transformers
from flax import nnx
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from mora_jax import data, console
from mora_jax.data import vqa
from mora_jax.models import hf, llama, llama_hf

NAME = "embedded"  # the lm.path value that selects this LM
VERSION = 1  # part of the cache directory name: bump it when the recipe or the architecture changes
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
MAX_LENGTH = 24  # tokens of one pre-training text with <s> and </s> (the longest is 20)
# easy-VQA's text is templated (273 distinct question/answer texts, 35 captions), so a few hundred steps over
# texts drawn in their natural frequencies learn it; more only costs first-build time. `answer_weight`: the
# weight of the answer tokens (and </s>) in the loss, the other tokens' being 1 (docs/mllm.md, "What reads the
# image").
RECIPE = dict(steps=800, batch_size=64, lr=3e-3, weight_decay=0.0, vocab_size=384, answer_weight=1.0)
ANSWER_MARKER = " answer:"  # what precedes the answer in every question text (vqa.prompt)


def pretraining_texts(split: vqa.VQASplit) -> list[str]:
  """Per question: the question with its answer ("question: ... answer: red"); the same after its image's caption
  ("a red circle question: ... answer: red"), which the image tokens replace in the multimodal model; and the
  caption said twice ("a red circle a red circle"). Then one caption per image.

  The repeated caption is what makes this small LM read back at all: without it, 1,500 steps left the loss flat
  at the optimum that ignores the caption (the described answers were no better than without the caption); with
  it, copying is learnt within a few hundred steps, and answering from the caption with it."""
  captions = split.captions()
  caption_of = dict(zip(captions.image_index.tolist(), captions.targets))
  qa = [f"{vqa.prompt(q)} {split.answer(i)}" for i, q in enumerate(split.questions)]
  described = [(caption_of[int(m)], text) for text, m in zip(qa, split.image_index) if int(m) in caption_of]
  return (qa + [f"{caption} {text}" for caption, text in described]
          + [f"{caption} {caption}" for caption, _ in described] + list(captions.targets))


def train_tokenizer(texts, directory: Path, vocab_size: int) -> transformers.PreTrainedTokenizerFast:
  """A byte-level BPE (GPT-2 conventions: spaces are part of tokens, any byte string round-trips) with
  <pad> <s> </s> as ids 0 1 2, written as tokenizer.json and loaded as transformers' fast tokenizer."""
  bpe = tokenizers.Tokenizer(models.BPE())
  bpe.normalizer = normalizers.Lowercase()
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                     show_progress=False))
  tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token=PAD, bos_token=BOS,
                                                   eos_token=EOS)
  directory.mkdir(parents=True, exist_ok=True)
  tokenizer.save_pretrained(str(directory))
  return tokenizer


def small_config(tokenizer) -> llama.LlamaConfig:
  """Width 128, 4 layers, 4 query and 2 key/value heads, tied embeddings: a few seconds per epoch on a CPU."""
  return llama.LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def encode(tokenizer, texts, max_length: int) -> tuple[np.ndarray, np.ndarray]:
  """<s> text </s>, right-padded: (ids int32 [N, max_length], mask int32); longer texts are an error."""
  ids = np.full((len(texts), max_length), tokenizer.pad_token_id, np.int32)
  mask = np.zeros((len(texts), max_length), np.int32)
  for i, text in enumerate(texts):
    tokens = [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]
    if len(tokens) > max_length:
      raise ValueError(f"pre-training text {text!r} has {len(tokens)} tokens, more than {max_length}.")
    ids[i, :len(tokens)], mask[i, :len(tokens)] = tokens, 1
  return ids, mask


def loss_weights(tokenizer, ids: np.ndarray, mask: np.ndarray, answer_weight: float) -> np.ndarray:
  """float32 [N, L]: `answer_weight` for the tokens after ANSWER_MARKER (the answer and </s>), 1 for the other
  valid tokens, 0 for padding."""
  marker = tokenizer.encode(ANSWER_MARKER, add_special_tokens=False)
  after = np.zeros(ids.shape, bool)
  for start in range(ids.shape[1] - len(marker)):
    ends_here = np.all(ids[:, start:start + len(marker)] == marker, axis=1)
    after[ends_here, start + len(marker):] = True
  return np.where(after, answer_weight, 1.0).astype(np.float32) * mask


def causal_lm_loss(logits: jax.Array, ids: jax.Array, weights: jax.Array) -> jax.Array:
  """Next-token cross-entropy over the targets, weighted (`weights` [N, L] of the target tokens: the mask, or
  `loss_weights`)."""
  targets, weights = ids[:, 1:], weights[:, 1:].astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], targets)
  return (losses * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def pretrain(model: llama.LlamaForCausalLM, ids: np.ndarray, mask: np.ndarray, weights: np.ndarray, *, steps: int,
             batch_size: int, lr: float, weight_decay: float, seed: int) -> list[float]:
  """Trains every parameter for `steps` batches of texts in shuffled passes (cosine schedule, 5% warm-up) on the
  loss weighted by `weights` (`loss_weights`); the mean loss of each tenth of the steps."""
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps, lr * 0.05),
                   weight_decay=weight_decay)
  graphdef, params = nnx.split(model)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, ids, mask, weights):
    loss, grads = jax.value_and_grad(
        lambda p: causal_lm_loss(nnx.merge(graphdef, p)(ids, mask)[0], ids, weights))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  order = np.concatenate([rng.permutation(len(ids)) for _ in range(-(-steps * batch_size // len(ids)))])
  losses = []
  for i in console.bar(range(steps), desc="LM pre-training", unit="step"):
    rows = order[i * batch_size:(i + 1) * batch_size]
    params, opt_state, loss = step(params, opt_state, ids[rows], mask[rows], weights[rows])
    losses.append(loss)
  nnx.update(model, params)
  return [float(np.mean(chunk)) for chunk in np.array_split(np.asarray(jax.device_get(losses)), 10)]


def directory_name(seed: int, recipe: dict | None = None) -> str:
  """The LM's folder in the cache: the version and seed, and a hash of the recipe's values where they differ from
  RECIPE (an ablation's LM is built beside the default one)."""
  changed = {k: v for k, v in sorted((recipe or {}).items()) if RECIPE.get(k) != v}
  suffix = f"-{hashlib.sha256(json.dumps(changed).encode()).hexdigest()[:8]}" if changed else ""
  return f"easy_vqa_llama-v{VERSION}-seed{seed}{suffix}"


def is_built(directory: Path) -> bool:
  return (directory / "pretraining.json").is_file()


def ensure(cache_dir: str | Path, data_dir: str | Path, seed: int = 0, recipe: dict | None = None,
           log=print) -> Path:
  """The embedded LM's directory under `cache_dir` (`recipe`: values of RECIPE to change), pre-training it first
  if it is not there yet."""
  directory = Path(cache_dir).expanduser() / directory_name(seed, recipe)
  if not is_built(directory):
    log(f"building the embedded LM (first use of {directory}): pre-training a small Llama-style LM on easy-VQA "
        "train text; later runs load it from there")
    build(directory, data_dir, seed=seed, recipe=recipe, log=log)
  return directory


def build(directory: str | Path, data_dir: str | Path, seed: int = 0, recipe: dict | None = None,
          log=print) -> Path:
  """Trains the tokenizer and the LM and writes config.json, model.safetensors, the tokenizer files and
  pretraining.json (recipe, losses, held-out loss) to `directory`; returns it."""
  directory = Path(directory).expanduser()
  recipe = {**RECIPE, **(recipe or {})}
  texts = pretraining_texts(vqa.load("train", data_dir, data.Missing(rate=0.0), log=log))
  staging = directory.with_name(f"{directory.name}.partial-{os.getpid()}")
  tokenizer = train_tokenizer(texts, staging, recipe["vocab_size"])
  model = llama.init(small_config(tokenizer), seed=seed)
  ids, mask = encode(tokenizer, texts, MAX_LENGTH)
  log(f"pre-training the LM on {len(texts)} texts: {recipe}")
  weights = loss_weights(tokenizer, ids, mask, recipe["answer_weight"])
  losses = pretrain(model, ids, mask, weights, seed=seed,
                    **{k: v for k, v in recipe.items() if k not in ("vocab_size", "answer_weight")})
  held_out = encode(tokenizer, pretraining_texts(vqa.load("validation", data_dir, data.Missing(rate=0.0),
                                                          log=log)), MAX_LENGTH)
  validation_loss = float(jax.jit(lambda i, m: causal_lm_loss(model(i, m)[0], i, m))(*held_out))
  log(f"LM pre-training losses (each tenth of the steps) {[round(l, 3) for l in losses]}; validation loss "
      f"{validation_loss:.4f}")
  llama_hf.save_pretrained(model, staging)
  (staging / "pretraining.json").write_text(json.dumps(
      {"seed": seed, "recipe": recipe, "texts": len(texts), "losses": losses,
       "validation_loss": validation_loss}, indent=2) + "\n")
  shutil.rmtree(directory, ignore_errors=True)
  staging.rename(directory)
  return directory


def load(directory: str | Path, dtype=jnp.float32
         ) -> tuple[llama.LlamaForCausalLM, transformers.PreTrainedTokenizerFast]:
  """The LM and its tokenizer from a directory `build` wrote (or any Llama or Qwen2 checkpoint directory with its
  tokenizer); an incomplete directory or a tokenizer that does not fit the config is refused before the weights
  are read."""
  directory = Path(directory)
  hf.check_complete(directory, hf.LM_TOKENIZER_FILES)
  config = llama_hf.read_config(directory)
  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
  except (OSError, ValueError) as e:
    raise FileNotFoundError(f"{directory} has no usable tokenizer ({e}); it needs the tokenizer.json that "
                            "save_pretrained writes.") from e
  hf.check_tokenizer_size(tokenizer, config.vocab_size, directory)
  return llama_hf.from_pretrained(directory, dtype), tokenizer
