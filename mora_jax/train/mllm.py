"""Training and testing the multimodal LLM (mora_jax.adapters.mllm) on easy-VQA: MokA in its native setting.

    results = mllm.train(config, workdir)   # config: `recipe(method)`; eval.json, metrics.jsonl, config.json
    results = mllm.evaluate_run(workdir)    # eval.py on such a workdir

Stage 1 aligns the projector on image captions (everything else frozen) and is saved once, in
<workdir>/stage1. Stage 2 trains the LM adapters (and the projector if `stage2.train_projector`) on question
answering under the run's missing table, with checkpoints in <workdir>/checkpoints as the CLIP runs have them
(orbax, the data iterator's position, resume from the newest intact one, the best by validation exact match).
Answers are generated greedily and scored by exact match, overall, per question type and per missing scenario.

Runs data-parallel over all devices (batch sharded on a "data" mesh axis, parameters replicated: the models
here are small); multi-process runs are not supported yet.
"""

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mora_jax import data, progress, sharding
from mora_jax.adapters import lm as lm_adapters
from mora_jax.adapters import mllm as mllm_lib
from mora_jax.backbones import backbone as backbone_lib
from mora_jax.backbones import embedded_lm
from mora_jax.data import vqa
from mora_jax.models import hf, llama_hf
from mora_jax.train import checkpoint as checkpoint_lib
from mora_jax.train import config as config_lib
from mora_jax.train.job import CONFIG_FILE, EVAL_FILE, check_writable, say
from mora_jax.train.writers import MetricWriter

TASK = "mllm"  # the config's `task` value that selects this loop
METRIC = "exact_match"
MAX_NEW_TOKENS = 3  # every easy-VQA answer is one word: its token(s) and </s>


def recipe(method: str) -> ml_collections.ConfigDict:
  """The easy-VQA MLLM run of `method`: "moka", "lora" or "moka_lambda0"."""
  methods = {"moka": dict(method="moka"), "lora": dict(method="lora"), "moka_lambda0": dict(method="moka", lam=0.0)}
  if method not in methods:
    raise ValueError(f"no MLLM recipe {method!r}; known: {sorted(methods)}.")
  c = ml_collections.ConfigDict()
  c.task = TASK
  c.dataset = "easy_vqa"
  c.data_dir = "data"
  c.missing = ml_collections.ConfigDict(dict(rate=0.7, type="both", seed=0))
  # missing_image: "none" (the sample has no image tokens) or "white" (the white image's tokens).
  c.missing_image = "none"
  # The frozen vision tower: the embedded CLIP (as the CLIP runs' backbone section).
  c.backbone = ml_collections.ConfigDict(dict(path="embedded", random_preset="", seed=0, dtype="float32",
                                              cache_dir="~/.cache/mora_jax"))
  # The frozen LM: "embedded" (built on first use in cache_dir) or a Llama/Qwen2 checkpoint directory with a
  # fast tokenizer.
  c.lm = ml_collections.ConfigDict(dict(path="embedded", seed=0, cache_dir="~/.cache/mora_jax"))
  c.projector = "mlp2x_gelu"  # or "linear"
  c.adapter = ml_collections.ConfigDict(dataclasses.asdict(lm_adapters.LMAdapterConfig(**methods[method])))
  c.layout = ml_collections.ConfigDict(dataclasses.asdict(vqa.Layout()))
  c.stage1 = ml_collections.ConfigDict(dict(steps=150, batch_size=64, lr=2e-3))
  c.stage2 = ml_collections.ConfigDict(dict(train_projector=True, lr=2e-3, weight_decay=0.0, warmup_fraction=0.03))
  c.epochs = 1
  c.batch_size = 64
  c.max_steps = 0
  c.seed = 42
  c.eval = ml_collections.ConfigDict(dict(batch_size=512, validation_samples=1000, test_samples=0))
  c.checkpoint = ml_collections.ConfigDict(dict(keep=2, every_steps=0))
  c.log_every_steps = 50
  return c


def is_run(workdir: str | Path) -> bool:
  """Whether `workdir` (a train.py workdir) holds an MLLM run."""
  path = Path(workdir) / CONFIG_FILE
  return path.is_file() and json.loads(path.read_text()).get("task") == TASK


# ------------------------------------------------------------------------------------------------ the model


@dataclasses.dataclass
class Setup:
  """The model split into what a stage trains and the rest, the tokenizer, image feature caches, and identity."""
  config: ml_collections.ConfigDict
  model: mllm_lib.MLLM
  tokenizer: object
  prep: data.Preprocessing
  identity: dict
  mesh: jax.sharding.Mesh
  features: dict = dataclasses.field(default_factory=dict)  # image set -> float32 [N_images, P, Dv]
  white: np.ndarray | None = None  # the white image's features [P, Dv]

  @property
  def layout(self) -> vqa.Layout:
    return vqa.Layout(**self.config.layout)

  def split_features(self, split: vqa.VQASplit) -> np.ndarray:
    """The frozen vision tower's features of the split's images, computed once per split."""
    if split.image_set not in self.features:
      graphdef, state = nnx.split(self.model)
      fn = jax.jit(lambda s, x: nnx.merge(graphdef, s).image_features(x))
      pixels = vqa.decode_images(split, self.prep)
      self.features[split.image_set] = np.concatenate(
          [np.asarray(fn(state, pixels[i:i + 256])) for i in range(0, len(pixels), 256)])
      if self.white is None:
        self.white = np.asarray(fn(state, self.prep.white_pixels()[None]))[0]
    return self.features[split.image_set]


def build(c: ml_collections.ConfigDict, log=say) -> Setup:
  """The MLLM of config `c`: embedded (or given) CLIP vision tower and LM, both frozen, with adapters."""
  clip = backbone_lib.load(c.backbone, 77, c.data_dir, mesh=None, rules=sharding.REPLICATED_RULES, log=log)
  lm_dir = embedded_lm.ensure(c.lm.cache_dir, c.data_dir, c.lm.seed, log=log) if c.lm.path == embedded_lm.NAME \
      else hf.resolve(c.lm.path)
  lm, tokenizer = embedded_lm.load(lm_dir)
  lm_identity = {"source": str(c.lm.path), "sha256": backbone_lib.weights_hash(llama_hf.to_hf_tensors(lm))}
  lm_adapters.adapt(lm, lm_adapters.LMAdapterConfig(**c.adapter), rngs=nnx.Rngs(c.seed))
  model = mllm_lib.MLLM(clip.model.vision_model, lm, c.projector, rngs=nnx.Rngs(c.seed + 1))
  prep = data.Preprocessing(image=clip.image_processing, missing_image="white")
  identity = {"source": f"{clip.identity['source']} + {lm_identity['source']}",
              "sha256": clip.identity["sha256"][:32] + lm_identity["sha256"][:32], "clip": clip.identity,
              "lm": lm_identity}
  mesh = sharding.make_mesh((jax.device_count(),), ("data",))
  return Setup(c, model, tokenizer, prep, identity, mesh)


def model_batch(setup: Setup, split: vqa.VQASplit, host: dict) -> mllm_lib.Batch:
  """A host batch of `vqa.Assemble` -> model inputs on the mesh (features gathered per sample)."""
  features = setup.split_features(split)
  present = host["image"] >= 0
  white = setup.config.missing_image == "white"
  feats = np.where(present[:, None, None], features[np.maximum(host["image"], 0)],
                   setup.white if white else 0.0).astype(np.float32)
  arrays = {"features": feats, "image_present": present | white, "input_ids": host["input_ids"],
            "text_valid": host["text_valid"], "prompt": host["prompt"],
            "answer": host["answer"] & host["valid"][:, None]}
  target = sharding.batch_sharding(setup.mesh, micro_axis=False)
  return mllm_lib.Batch(**sharding.global_batch(arrays, list(arrays), target, False))


# --------------------------------------------------------------------------------------------- the steps


def trainable_filter(stage: int, train_projector: bool):
  if stage == 1:
    return mllm_lib.ProjectorParam
  return nnx.Any(lm_adapters.LMAdapter, mllm_lib.ProjectorParam) if train_projector else lm_adapters.LMAdapter


def make_train_step(graphdef, tx, mesh):
  replicated = NamedSharding(mesh, PartitionSpec())

  def step(state, frozen, batch: mllm_lib.Batch):
    key = jax.random.fold_in(state["rng"], state["step"])

    def loss_fn(params):
      logits, seq = nnx.merge(graphdef, params, frozen)(batch, rngs=nnx.Rngs(dropout=key))
      return mllm_lib.answer_loss(logits, seq)

    (loss, tokens), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    state = {"params": optax.apply_updates(state["params"], updates), "opt": opt, "step": state["step"] + 1,
             "rng": state["rng"]}
    return state, {"loss": loss, "answer_tokens": tokens}

  return jax.jit(step, out_shardings=(replicated, replicated), donate_argnums=(0,))


def make_generate(graphdef, setup: Setup):
  tok = setup.tokenizer

  @jax.jit
  def generate(params, frozen, batch):
    return nnx.merge(graphdef, params, frozen).generate(batch, MAX_NEW_TOKENS, eos_token_id=tok.eos_token_id,
                                                        pad_token_id=tok.pad_token_id)

  return generate


def exact_match_metrics(setup: Setup, generate, params, frozen, split: vqa.VQASplit, limit: int = 0) -> dict:
  """Greedy answers of the split (its first `limit` samples when > 0) scored against the true answers:
  {"exact_match", "per_question_type": {name: exact match}, "samples"}."""
  c, tok = setup.config, setup.tokenizer
  correct, types = [], []
  for host in vqa.eval_batches(split, tok, setup.layout, c.eval.batch_size, limit):
    tokens = np.asarray(generate(params, frozen, model_batch(setup, split, host)))
    answers = tok.batch_decode(tokens, skip_special_tokens=True)
    for row, answer in zip(host["row"], answers):
      if row >= 0:
        correct.append(answer.strip() == split.answer(row))
        types.append(int(split.question_type[row]))
  correct, types = np.asarray(correct), np.asarray(types)
  return {METRIC: float(correct.mean()), "samples": int(len(correct)),
          "per_question_type": {name: float(correct[types == i].mean()) for i, name in enumerate(split.type_names)
                                if np.any(types == i)}}


def scenario_metrics(setup, generate, params, frozen, test: vqa.VQASplit, limit: int = 0) -> dict:
  return {kind: exact_match_metrics(setup, generate, params, frozen, test.scenario(kind), limit)
          for kind in data.SCENARIOS}


def format_table(results: dict) -> str:
  types = list(next(iter(results.values()))["per_question_type"])
  lines = [f"{'scenario':<14}{'exact match':>12}" + "".join(f"{t:>10}" for t in types)]
  for kind, r in results.items():
    lines.append(f"{kind:<14}{100 * r[METRIC]:>12.2f}" + "".join(f"{100 * r['per_question_type'][t]:>10.2f}"
                                                              for t in types))
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- stages


def _adamw(lr_schedule, weight_decay: float):
  return optax.adamw(lr_schedule, b1=0.9, b2=0.999, weight_decay=weight_decay)


def _meta(setup: Setup, stage: int, best=None) -> dict:
  return {"config": json.loads(config_lib.to_json(setup.config)), "backbone": setup.identity, "data": "easy_vqa",
          "stage": stage, "loop": {"best_metric": None if best is None else best[0],
                                   "best_step": None if best is None else best[1]},
          "process_count": jax.process_count()}


def _restore(ckpt: checkpoint_lib.Checkpointer, state, data_iter, setup: Setup, where: str):
  """The newest intact checkpoint's (meta, state), the data iterator repositioned."""
  abstract = sharding.abstract(state, NamedSharding(setup.mesh, PartitionSpec()))

  def restore(step):
    meta = ckpt.meta(step)
    checkpoint_lib.check_config(meta, setup.config, where)
    checkpoint_lib.check_backbone(meta, setup.identity, where)
    restored = ckpt.restore_state(step, abstract)
    ckpt.restore_data(step, data_iter)
    return meta, restored

  step, (meta, restored) = ckpt.restore_first_intact(sorted(ckpt.all_steps(), reverse=True), restore,
                                                     move_damaged=True, log=say)
  say(f"resumed from {ckpt.directory / str(step)} (step {step})")
  return meta, restored


def run_stage(setup: Setup, stage: int, split: vqa.VQASplit, directory: Path, *, steps: int, total_steps: int,
              batch_size: int, lr: float, weight_decay: float, warmup_fraction: float, writer: MetricWriter,
              validate=None, steps_per_epoch: int | None = None):
  """Trains the stage's parameters on `split` for `steps` steps (a cosine schedule spanning `total_steps`), with
  checkpoints in `directory` at every epoch's end (ranked by `validate`'s exact match when given), every
  `checkpoint.every_steps`, and at the end; resumes from there. Returns (params, frozen, best (value, step))."""
  c = setup.config
  graphdef, params, frozen = nnx.split(setup.model, trainable_filter(stage, c.stage2.train_projector), ...)
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, int(total_steps * warmup_fraction), total_steps, 0.0)
  tx = _adamw(schedule, weight_decay)
  replicated = NamedSharding(setup.mesh, PartitionSpec())
  state = jax.device_put({"params": params, "opt": tx.init(params), "step": jnp.int32(0),
                          "rng": jax.random.key_data(jax.random.key(c.seed + stage))}, replicated)
  frozen = jax.device_put(frozen, replicated)
  data_iter = iter(vqa.train_batches(split, setup.tokenizer, setup.layout, batch_size, c.seed + stage))
  ckpt = checkpoint_lib.Checkpointer(directory, c.checkpoint.keep, metric=METRIC if validate else None)
  best = None
  if ckpt.all_steps():
    meta, state = _restore(ckpt, state, data_iter, setup, str(directory))
    if meta["loop"]["best_step"] is not None:
      best = (meta["loop"]["best_metric"], meta["loop"]["best_step"])
  train_step = make_train_step(graphdef, tx, setup.mesh)
  step = int(state["step"])
  bar = progress.bar(total=steps, initial=step, desc=f"stage {stage}", unit="step")
  window, started = [], time.perf_counter()
  while step < steps:
    host = next(data_iter)
    state, metrics = train_step(state, frozen, model_batch(setup, split, host))
    step += 1
    bar.update(1)
    window.append(metrics["loss"])
    if step % c.log_every_steps == 0 or step == steps:
      loss = float(np.mean(jax.device_get(window)))
      rate = len(window) / (time.perf_counter() - started)
      writer.write(step, f"stage{stage}/train", {"loss": loss, "steps_per_s": rate})
      bar.set_postfix(loss=f"{loss:.4f}")
      window, started = [], time.perf_counter()
    epoch_end = steps_per_epoch is not None and step % steps_per_epoch == 0
    if validate is not None and (epoch_end or step == steps):
      value = validate(state["params"], frozen)[METRIC]
      writer.write(step, f"stage{stage}/val", {METRIC: value})
      if best is None or value > best[0]:
        best = (value, step)
      say(f"stage {stage} step {step}: validation exact match {100 * value:.2f} (best {100 * best[0]:.2f} at step "
          f"{best[1]})")
      ckpt.save(step, state, data_iter, _meta(setup, stage, best), metrics={METRIC: value})
    elif step == steps or (c.checkpoint.every_steps and step % c.checkpoint.every_steps == 0):
      ckpt.save(step, state, data_iter, _meta(setup, stage, best))
  bar.close()
  ckpt.wait()
  if validate is not None and best is not None and best[1] != step:
    abstract = sharding.abstract({"params": state["params"]}, replicated)["params"]
    state = {**state, "params": ckpt.restore_params(best[1], abstract)}
  ckpt.close()
  nnx.update(setup.model, state["params"])
  return state["params"], frozen, best


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  """Stage 1 (projector on captions), stage 2 (adapters on QA), then the test per missing scenario."""
  c, workdir = config, Path(workdir)
  check_writable(workdir / "checkpoints", "--workdir")
  setup = build(c)
  if sharding.is_main_process():
    (workdir / CONFIG_FILE).write_text(config_lib.to_json(c) + "\n")
  writer = MetricWriter(workdir)
  train_split = vqa.load("train", c.data_dir, data.Missing(**c.missing), log=say)
  validation = vqa.load("validation", c.data_dir, data.Missing(**c.missing), log=say)
  test_split = vqa.load("test", c.data_dir, data.Missing(**c.missing), log=say)
  say(f"MLLM: {_describe(setup)}")
  started = time.perf_counter()
  s1 = c.stage1
  run_stage(setup, 1, train_split.captions(), workdir / "stage1", steps=s1.steps, total_steps=s1.steps,
            batch_size=s1.batch_size, lr=s1.lr, weight_decay=0.0, warmup_fraction=0.03, writer=writer)
  graphdef = nnx.graphdef(setup.model)
  generate = make_generate(graphdef, setup)
  validate = lambda params, frozen: exact_match_metrics(setup, generate, params, frozen, validation,
                                                        c.eval.validation_samples)
  steps_per_epoch = -(-len(train_split) // c.batch_size)
  total = steps_per_epoch * c.epochs
  steps = min(total, c.max_steps) if c.max_steps > 0 else total
  s2 = c.stage2
  params, frozen, best = run_stage(setup, 2, train_split, workdir / "checkpoints", steps=steps, total_steps=total,
                                   batch_size=c.batch_size, lr=s2.lr, weight_decay=s2.weight_decay,
                                   warmup_fraction=s2.warmup_fraction, writer=writer, validate=validate,
                                   steps_per_epoch=steps_per_epoch)
  train_seconds = time.perf_counter() - started
  results = {"task": TASK, "dataset": c.dataset, "method": method_name(c), "metric": METRIC,
             "checkpoint_step": best[1], "best_validation": best[0], "missing": c.missing.to_dict(),
             "test": scenario_metrics(setup, generate, params, frozen, test_split, c.eval.test_samples),
             "parameters": count_parameters(setup.model), "train_seconds": round(train_seconds, 1)}
  writer.write(best[1], "test", {k: v[METRIC] for k, v in results["test"].items()})
  writer.close()
  if sharding.is_main_process():
    (workdir / EVAL_FILE).write_text(json.dumps(results, indent=2) + "\n")
  say(f"test (easy-VQA MLLM, {results['method']}, checkpoint of step {best[1]}; missing {c.missing.type} "
      f"{c.missing.rate}):\n{format_table(results['test'])}\nwritten to {workdir / EVAL_FILE}")
  return results


def method_name(c) -> str:
  if c.adapter.method == "moka" and c.adapter.lam == 0.0:
    return "moka_lambda0"
  return c.adapter.method


def count_parameters(model: mllm_lib.MLLM) -> dict:
  count = lambda state: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
  return {"frozen": count(nnx.state(model, nnx.Param)), "adapter": count(nnx.state(model, lm_adapters.LMAdapter)),
          "projector": count(nnx.state(model, mllm_lib.ProjectorParam))}


def _describe(setup: Setup) -> str:
  n = count_parameters(setup.model)
  a = setup.config.adapter
  cross_attention = f", lambda {a.lam}" if a.method == "moka" else ""  # LoRA has no cross term to weigh
  return (f"{method_name(setup.config)} (rank {a.rank}, alpha {a.alpha}{cross_attention}) on {a.targets} from LM layer "
          f"{a.start_layer}; parameters: frozen {n['frozen']}, adapter {n['adapter']}, projector {n['projector']}")


def evaluate_run(workdir: str | Path, checkpoint: str | Path | None = None, missing: dict | None = None,
                 config_overrides=()) -> dict:
  """eval.py on an MLLM workdir: the best (or the given) stage-2 checkpoint tested per missing scenario."""
  workdir = Path(workdir) if workdir else Path(checkpoint).parent.parent
  c = config_lib.from_json((workdir / CONFIG_FILE).read_text())
  config_lib.apply_overrides(c, list(config_overrides))
  with c.unlocked():
    for key, value in (missing or {}).items():
      config_lib.override(c.missing, key, value)
  setup = build(c)
  test_split = vqa.load("test", c.data_dir, data.Missing(**c.missing), log=say)
  replicated = NamedSharding(setup.mesh, PartitionSpec())
  # The stage-1 projector, then the stage-2 parameters (the adapters, and the projector if stage 2 trained it).
  for directory, stage in ((workdir / "stage1", 1), (workdir / "checkpoints", 2)):
    ckpt = checkpoint_lib.Checkpointer(directory, read_only=True)
    if stage == 1:
      step = ckpt.latest_step()
    else:
      step = int(Path(checkpoint).name) if checkpoint else ckpt.steps_best_first(METRIC, None)[0]
    _, params, _ = nnx.split(setup.model, trainable_filter(stage, c.stage2.train_projector), ...)
    nnx.update(setup.model, ckpt.restore_params(step, sharding.abstract(params, replicated)))
    ckpt.close()
  graphdef, params, frozen = nnx.split(setup.model, trainable_filter(2, c.stage2.train_projector), ...)
  results = {"task": TASK, "method": method_name(c), "metric": METRIC, "checkpoint_step": step,
             "missing": c.missing.to_dict(),
             "test": scenario_metrics(setup, make_generate(graphdef, setup), params, frozen, test_split,
                                      c.eval.test_samples)}
  say(format_table(results["test"]))
  return results
