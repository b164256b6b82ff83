"""A CLIP tokenizer that needs no download: transformers' CLIPTokenizer over a byte-level vocabulary.

Every byte is a token (plus its end-of-word form), so any text tokenizes; the special tokens and the
padding/truncation behaviour are CLIP's (pad == EOS, EOS kept last on truncation). It serves pipelines,
tests and benchmarks where no checkpoint tokenizer is at hand; real runs use the checkpoint's own tokenizer.
"""

import json
import os
import tempfile
from pathlib import Path

import transformers


def _write_atomically(path: Path, text: str) -> None:
  """Readers (other processes of a multi-host run sharing the directory) never see a half-written file."""
  with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
    f.write(text)
  os.replace(f.name, path)


def byte_level_clip_tokenizer(directory: str | Path) -> transformers.CLIPTokenizer:
  """Writes vocab.json and merges.txt into `directory` and returns the tokenizer over them."""
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  # GPT-2's byte -> unicode table: printable bytes map to themselves, the others to code points from 256.
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  others = [b for b in range(256) if b not in printable]
  chars = [chr(c) for c in printable] + [chr(256 + i) for i in range(len(others))]
  vocab = chars + [c + "</w>" for c in chars] + ["th", "the</w>", "<|startoftext|>", "<|endoftext|>"]
  _write_atomically(directory / "vocab.json", json.dumps({token: i for i, token in enumerate(vocab)}))
  _write_atomically(directory / "merges.txt", "#version: 0.2\nt h\nth e</w>\n")
  return transformers.CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
