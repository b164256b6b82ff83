"""Shared test utilities: random Hugging Face CLIP checkpoints, jitted feature functions, small raw datasets,
and runs of train.py / eval.py on them."""

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from mora_jax import adapters, clip
from mora_jax.train import checkpoint, config as config_lib, writers

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "hateful_memes_mora.py")


@contextlib.contextmanager
def xla_optimized():
  """XLA's optimization passes on (tests/conftest.py turns most of them off), for work that computes more than
  it compiles (docs/testing.md has the measured difference)."""
  disabled = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", disabled)


def tiny_config(**text_overrides) -> clip.CLIPConfig:
  cfg = clip.preset("tiny")
  return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, **text_overrides))


def random_inputs(cfg: clip.CLIPConfig, batch: int = 3, length: int = 12, seed: int = 0):
  """NCHW pixels, and token ids that end with EOS followed by EOS-padding (as OpenAI's tokenizer pads)."""
  rng = np.random.RandomState(seed)
  v = cfg.vision
  pixels = rng.randn(batch, v.num_channels, v.image_size, v.image_size).astype(np.float32)
  eos = cfg.text.eos_token_id
  ids = rng.randint(3, cfg.text.vocab_size - 1, size=(batch, length))
  ids[ids == eos] = 3
  mask = np.ones((batch, length), np.int64)
  for b in range(batch):
    end = length - 1 - 2 * b  # different text lengths per row, the first row unpadded
    ids[b, end] = eos if eos != 2 else cfg.text.vocab_size - 1
    ids[b, end + 1:] = ids[b, end]
    mask[b, end + 1:] = 0
  return pixels, ids, mask


def jit_features(model: clip.CLIP):
  """Jitted (image, text) feature functions over the model's current state."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def image(state, pixels):
    return nnx.merge(graphdef, state).get_image_features(pixels)

  @jax.jit
  def text(state, ids, mask):
    return nnx.merge(graphdef, state).get_text_features(ids, mask)

  return (lambda pixels: np.asarray(image(state, pixels)),
          lambda ids, mask: np.asarray(text(state, ids, mask)))


def perturb_trainables(clf: adapters.Classifier, seed: int = 1) -> None:
  """Moves every trainable leaf off its init (non-zero B factors, magnitudes away from the column norms), so
  that every term of an adapter's formula matters in a comparison."""
  rng = np.random.RandomState(seed)
  _, params = adapters.split(clf)
  for variable in jax.tree.leaves(adapters.trainable(params), is_leaf=lambda v: isinstance(v, nnx.Variable)):
    value = np.asarray(variable.get_value())
    variable.set_value(jnp.asarray(value + 0.3 * rng.randn(*value.shape).astype(np.float32)))



def coloured_png(rng: np.random.RandomState, channels) -> bytes:
  """A random 40x40 PNG with the colour `channels` (0 red, 1 green, 2 blue) raised: a label a few training
  steps can see."""
  import io  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  pixels = rng.randint(0, 120, (40, 40, 3)).astype(np.uint8)
  pixels[..., list(channels)] += 120
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, "PNG")
  return buffer.getvalue()


def write_memes(root, sizes=(("train", 64), ("dev", 16), ("test", 24)), seed=0) -> None:
  """A small Hateful Memes raw layout (img/<id>.png, <split>.jsonl) whose label is visible in the image
  colour and in the text, so a few steps already move the loss."""
  import json  # pylint: disable=import-outside-toplevel
  rng = np.random.RandomState(seed)
  (root / "img").mkdir(parents=True, exist_ok=True)
  meme = 0
  for split, count in sizes:
    lines = []
    for _ in range(count):
      meme += 1
      label = int(rng.randint(2))
      (root / "img" / f"{meme:05d}.png").write_bytes(coloured_png(rng, [label]))
      words = ("kind", "nice", "good") if label == 0 else ("mean", "cruel", "bad")
      lines.append(json.dumps({"id": meme, "img": f"img/{meme:05d}.png", "label": label,
                               "text": f"a {words[rng.randint(3)]} meme number {meme}"}))
    (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


def memes_overrides(tmp_path, **extra) -> list[str]:
  """train.py flags: MoRA on the `write_memes` fixture with a random tiny CLIP, 8-sample steps."""
  values = {"dataset": "hateful_memes", "data_dir": tmp_path / "data", "manual_dir": tmp_path / "raw",
            "backbone.path": "", "backbone.random_preset": "tiny", "adapter.start_layer": 1,
            "preprocessing.max_length": 24, "batch_size": 16, "eval.batch_size": 16, "epochs": 2,
            "log_every_steps": 1, "data_threads": 1, **extra}
  return [f"--config.{key}={value}" for key, value in values.items()]


def write_food101(root, classes=101, per_split=(("train", 8), ("val", 4), ("test", 4)), seed=0) -> None:
  """A small UPMC Food-101 raw layout with all `classes` classes in class_idx.json (the head's size)."""
  import json  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.RandomState(seed)
  names = [f"dish{c:03d}" for c in range(classes)]
  files, texts = {}, {}
  for split, count in per_split:
    files[split] = []
    for k in range(count):
      name = f"{names[rng.randint(classes)]}_{split}{k}.jpg"
      folder = root / "images" / ("test" if split == "test" else "train") / name.rsplit("_", 1)[0]
      folder.mkdir(parents=True, exist_ok=True)
      Image.fromarray(rng.randint(0, 255, (48, 64, 3)).astype(np.uint8)).save(folder / name)
      files[split].append(name)
      texts[name] = f"recipe page for {name}"
  (root / "class_idx.json").write_text(json.dumps({n: i for i, n in enumerate(names)}))
  (root / "text.json").write_text(json.dumps(texts))
  (root / "split.json").write_text(json.dumps(files))


def write_arrow(path, columns: dict) -> None:
  """An Arrow IPC file of `columns`, as the authors' preprocessed {train,val,test}.arrow files."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  table = pa.table(columns)
  with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
    writer.write_table(table)


def memes_config(tmp_path, overrides: dict):
  """The MoRA Hateful Memes config with `memes_overrides(tmp_path, **overrides)` applied."""
  config = config_lib.load(CONFIG)
  config_lib.apply_overrides(config, [tuple(flag[len("--config."):].split("=", 1)) for flag in
                                      memes_overrides(tmp_path, **overrides)])
  return config


def run_script(script, args, devices=1, timeout=300, check=True, env_extra=None, **popen):
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "PYTHONPATH": str(ROOT),
         **(env_extra or {})}
  proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], env=env, capture_output=True,
                        text=True, timeout=timeout, check=False, **popen)
  if check and proc.returncode != 0:
    raise AssertionError(f"{script} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
  return proc


def two_processes(config, workdir, flags, script=None) -> list[tuple[int, str]]:
  """(exit status, stdout + stderr) of train.py's two processes (or `script`, run as train.py is) with `config`, on
  2 simulated devices each, coordinated on a free local port."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PYTHONPATH": str(ROOT)}
  program = ["-c", script, "-"] if script else [str(ROOT / "train.py")]
  procs = [subprocess.Popen([sys.executable, *program, "--config", str(config), "--workdir", str(workdir), *flags,
                             "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
                             "--process_id", str(i)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    outputs = [p.communicate(timeout=240) for p in procs]
  finally:
    for p in procs:
      p.kill()
  return [(p.returncode, out + err) for p, (out, err) in zip(procs, outputs)]


def train_losses(workdir) -> list[float]:
  return [r["loss"] for r in writers.read_metrics(workdir) if r["kind"] == "train"]


def saved_test_results(workdir) -> dict:
  return json.loads((Path(workdir) / "eval.json").read_text())["test"]


def final_state(workdir):
  """The latest checkpoint's step and state (numpy leaves)."""
  ckpt = checkpoint.Checkpointer(Path(workdir) / "checkpoints", read_only=True)
  step = ckpt.latest_step()
  state = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  ckpt.close()
  return step, jax.tree.map(np.asarray, state)


def assert_one_line_error(stderr: str, returncode: int, *fragments) -> None:
  """Bad input's outcome: exit status 2, no traceback, one `error:` line holding each of `fragments`."""
  assert returncode == 2, stderr[-2000:]
  assert "Traceback" not in stderr, stderr[-2000:]
  error = [line for line in stderr.splitlines() if line.startswith("error: ")]
  assert len(error) == 1, stderr[-2000:]
  for fragment in fragments:
    assert fragment in error[0], error[0]


def saved_checkpoint(directory: Path, step: int = 1) -> Path:
  """`directory` holding one tiny checkpoint, as a run saves it (trained parameters {"w": 2 values}); its folder."""
  ckpt = checkpoint.Checkpointer(directory)
  ckpt.save(step, {"params": {"w": np.ones(2, np.float32)}}, iter(grain.MapDataset.range(2).to_iter_dataset()),
            {"step": step})
  ckpt.close()
  return directory / str(step)


def tiny_lm(directory, data_dir) -> Path:
  """A random small Llama (2 layers, width 32) with the embedded LM's tokenizer trained on the easy-VQA data in
  `data_dir`, saved in `directory`: the MLLM tests' LM."""
  from mora_jax.backbones import embedded_lm  # pylint: disable=import-outside-toplevel
  from mora_jax.data import missing as missing_lib, vqa  # pylint: disable=import-outside-toplevel
  from mora_jax.models import llama, llama_hf  # pylint: disable=import-outside-toplevel
  train = vqa.load("train", data_dir, missing_lib.Missing(rate=0.0))
  tokenizer = embedded_lm.train_tokenizer(embedded_lm.pretraining_texts(train), directory, 384)
  config = llama.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
  llama_hf.save_pretrained(llama.init(config), directory)
  return Path(directory)
