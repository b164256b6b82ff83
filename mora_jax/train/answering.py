"""The question-answering task: the multimodal LLM (mora_jax.adapters.mllm) on easy-VQA, MokA in its native
setting (config.task == "mllm"; recipes: mora_jax.train.recipes.mllm).

    results = loop.train(config, workdir)           # eval.json, metrics.jsonl, config.json, as every task
    results = answering.evaluate_run(workdir)       # eval.py on such a workdir

Two stages of the one training loop (mora_jax.train.loop): "stage1" aligns the projector on image captions or
attribute questions (`stage1.data`; everything else frozen), checkpointed in <workdir>/stage1; "stage2" trains
the LM adapters (and the projector if `stage2.train_projector`) on question answering under the run's missing
table, checkpointed in <workdir>/checkpoints and validated by generated exact match every epoch. Answers are
generated greedily and scored by exact match, overall, per question type and per missing scenario.

Data-parallel over every device of every process (batch sharded over the mesh, parameters replicated: the models
here are small); each process assembles its rows of every global batch, as the classifier's loop does.
"""

import dataclasses
import json
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mora_jax import adapters, data, sharding
from mora_jax.adapters import mllm as mllm_lib
from mora_jax.adapters import optim, partition
from mora_jax.backbones import backbone as backbone_lib
from mora_jax.backbones import embedded, embedded_lm
from mora_jax.console import say
from mora_jax.data import vqa
from mora_jax.models import hf, llama_hf
from mora_jax.train import checkpoint as checkpoint_lib
from mora_jax.train import config as config_lib
from mora_jax.train import evaluation
from mora_jax.train import job as job_lib
from mora_jax.train import step as step_lib
from mora_jax.train.job import check_writable
from mora_jax.train.tasks import MLLM, Stage, epoch_steps
from mora_jax.train.writers import MetricWriter

METRIC = "exact_match"
MAX_NEW_TOKENS = 3  # every easy-VQA answer is one word: its token(s) and </s>
FEATURE_BATCH = 256  # images per call of the frozen vision tower when its features are cached
# Stage 1's alignment data from the train split: one caption per image ("a red circle", LLaVA's kind), or per image
# a what-colour and a what-shape question with its answer (vqa.VQASplit.attribute_questions; docs/mllm.md).
STAGE1_DATA = {"captions": vqa.VQASplit.captions, "questions": vqa.VQASplit.attribute_questions}
# The smallest meaningful value of each count in an MLLM config (config.check_minimums).
MINIMUMS = {"epochs": 1, "batch_size": 1, "max_steps": 0, "log_every_steps": 1, "seed": 0, "stage1.steps": 1,
            "stage1.batch_size": 1, "eval.batch_size": 1, "eval.validation_samples": 0, "eval.test_samples": 0,
            "checkpoint.keep": 1, "checkpoint.every_steps": 0, "missing.seed": 0}


def is_run(workdir: str | Path) -> bool:
  """Whether `workdir` (a train.py workdir) holds an MLLM run."""
  saved = job_lib.read_config_file(workdir)
  return saved is not None and saved.get("task") == MLLM


def method_name(c: ml_collections.ConfigDict) -> str:
  if c.adapter.method == "moka" and c.adapter.lam == 0.0:
    return "moka_lambda0"
  return c.adapter.method


def answer_loss(model: mllm_lib.MLLM, micro: mllm_lib.Batch, rngs: nnx.Rngs):
  """(the mean cross-entropy of a micro-batch's answer tokens, their count): step.LossFn with mean_loss, as this
  task's runs always computed it, dropout keys included (their numbers, docs/mllm.md, carry over bit for bit)."""
  logits, seq = model(micro, rngs=rngs)
  return mllm_lib.answer_loss(logits, seq)


@dataclasses.dataclass
class Answering:
  """The multimodal LLM, its tokenizer, splits and the frozen vision tower's feature caches (tasks.Task)."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  graphdef: nnx.GraphDef
  params: dict
  tokenizer: object
  prep: data.Preprocessing
  identity: dict
  missing: data.Missing  # config.missing, read once
  splits: dict  # stage or split name -> vqa.VQASplit: "stage1" (STAGE1_DATA), "stage2" (= "train"), "validation"
  encode_images: object  # float32 pixels [N, 3, H, W] -> the frozen vision tower's features [N, P, Dv], locally
  generate: object  # jitted (trained, frozen, Batch) -> greedy answer tokens [B, MAX_NEW_TOKENS]
  features: dict = dataclasses.field(default_factory=dict)  # image set -> float32 [N_images, P, Dv]
  white: np.ndarray | None = None  # the white image's features [P, Dv]
  training: vqa.VQASplit | None = None  # the split of the stage being trained
  metric = METRIC
  loss = staticmethod(answer_loss)
  mean_loss = True

  @property
  def layout(self) -> vqa.Layout:
    return vqa.Layout(**self.config.layout)

  def stages(self) -> list[Stage]:
    c = self.config
    s1, s2 = c.stage1, c.stage2
    train_projector = ("projector",) if s2.train_projector else ()
    schedule1 = step_lib.lr_schedule(s1.lr, s1.steps, 0.03)
    steps_per_epoch = epoch_steps(len(self.splits["stage2"]), c.batch_size)
    schedule2 = step_lib.lr_schedule(s2.lr, steps_per_epoch * c.epochs, s2.warmup_fraction)
    common = dict(accum_steps=1, max_steps=0, patience=c.epochs)
    return [
        Stage(name="stage1", directory="stage1", trained=("projector",), steps_per_epoch=s1.steps, epochs=1,
              batch_size=s1.batch_size, samples=s1.steps * s1.batch_size, tx=_adamw(schedule1, 0.0),
              schedule=schedule1, seed=c.seed + 1, validates=False, **common),
        Stage(name="stage2", directory="checkpoints", trained=("adapter/decoder", *train_projector),
              steps_per_epoch=steps_per_epoch, epochs=c.epochs, batch_size=c.batch_size,
              samples=len(self.splits["stage2"]), tx=_adamw(schedule2, s2.weight_decay), schedule=schedule2,
              seed=c.seed + 2, validates=True, **{**common, "max_steps": c.max_steps}),
    ]

  def summary_lines(self) -> list[str]:
    n = partition.count(self.params)
    a = self.config.adapter
    cross_attention = f", lambda {a.lam}" if a.method == "moka" else ""  # LoRA has no cross term to weigh
    return [f"MLLM: {method_name(self.config)} (rank {a.rank}, alpha {a.alpha}{cross_attention}) on {a.targets} from "
            f"LM layer {a.start_layer}; parameters: frozen {n['backbone']}, adapter {n['adapter/decoder']}, projector "
            f"{n['projector']}"]

  def initialize(self, stage: Stage) -> None:
    del stage  # nothing to take: config.init_from is the classifier's

  def frozen_shardings(self, frozen: dict):
    return jax.tree.map(lambda _: NamedSharding(self.mesh, PartitionSpec()), frozen)

  def start_stage(self, stage: Stage, trained: dict, frozen_shardings) -> None:
    del stage, trained, frozen_shardings  # the splits' image features are computed on first use

  def train_batches(self, stage: Stage):
    self.training = self.splits[stage.name]
    return iter(vqa.train_batches(self.training, self.tokenizer, self.layout, _per_process(stage.batch_size),
                                  stage.seed, process_index=jax.process_index(),
                                  process_count=jax.process_count(), accum_steps=stage.accum_steps))

  def device_batch(self, micro: list[dict]) -> tuple[mllm_lib.Batch, int]:
    host = {k: np.stack([v[k] for v in micro]) for k in micro[0]}
    return self.model_batch(self.training, host, micro_axis=True), 0

  def device_arrays(self, split: str) -> dict:
    del split
    return {}

  @staticmethod
  def expand(batch, device_arrays: dict):
    del device_arrays
    return batch

  def meta(self) -> dict:
    return {"data": "easy_vqa"}

  def check_resume(self, meta: dict, where: str) -> None:
    checkpoint_lib.check_data(meta, "easy_vqa", where)

  def split_features(self, split: vqa.VQASplit) -> np.ndarray:
    """The frozen vision tower's features of the split's images, computed once per split (on every process)."""
    if split.image_set not in self.features:
      pixels = vqa.decode_images(split, self.prep)
      self.features[split.image_set] = np.concatenate(
          [self.encode_images(pixels[i:i + FEATURE_BATCH]) for i in range(0, len(pixels), FEATURE_BATCH)])
      if self.white is None:
        self.white = self.encode_images(self.prep.white_pixels()[None])[0]
    return self.features[split.image_set]

  def model_batch(self, split: vqa.VQASplit, host: dict, micro_axis: bool = False) -> mllm_lib.Batch:
    """This process's rows of a batch of `vqa.Assemble` (with a leading micro-batch axis if `micro_axis`) -> the
    global model inputs on the mesh (image features gathered per sample)."""
    features = self.split_features(split)
    present = host["image"] >= 0
    white = self.config.missing_image == "white"
    feats = np.where(present[..., None, None], features[np.maximum(host["image"], 0)],
                     self.white if white else 0.0).astype(np.float32)
    arrays = {"features": feats, "image_present": present | white, "input_ids": host["input_ids"],
              "text_valid": host["text_valid"], "prompt": host["prompt"],
              "answer": host["answer"] & host["valid"][..., None]}
    target = sharding.batch_sharding(self.mesh, micro_axis=micro_axis)
    return sharding.global_arrays(mllm_lib.Batch(**arrays), target, micro_axis)

  def exact_match(self, trained: dict, frozen: dict, split: vqa.VQASplit, limit: int = 0) -> dict:
    """Greedy answers of the split (its first `limit` samples when > 0) scored against the true answers:
    {"exact_match", "per_question_type": {name: exact match}, "samples"}. Each process answers its own rows."""
    c, tok = self.config, self.tokenizer
    rows, correct, types = [], [], []
    for host in vqa.eval_batches(split, tok, self.layout, _per_process(c.eval.batch_size), limit,
                                 process_index=jax.process_index(), process_count=jax.process_count()):
      tokens = sharding.process_rows(self.generate(trained, frozen, self.model_batch(split, host)))
      for row, answer in zip(host["row"], tok.batch_decode(tokens, skip_special_tokens=True)):
        rows.append(row)
        correct.append(row >= 0 and answer.strip() == split.answer(row))
        types.append(int(split.question_type[max(row, 0)]))
    joined = sharding.gather_rows({"row": np.asarray(rows), "correct": np.asarray(correct, bool),
                                   "type": np.asarray(types)})
    valid = joined["row"] >= 0
    correct, types = joined["correct"][valid], joined["type"][valid]
    return {METRIC: float(correct.mean()), "samples": int(valid.sum()),
            "per_question_type": {name: float(correct[types == i].mean()) for i, name in enumerate(split.type_names)
                                  if np.any(types == i)}}

  def validate(self, trained: dict, frozen: dict) -> dict:
    return self.exact_match(trained, frozen, self.splits["validation"], self.config.eval.validation_samples)

  def test(self, trained: dict, step: int, writer, record, train_seconds: float | None) -> tuple[dict, str]:
    c = self.config
    test_split = vqa.load("test", c.data_dir, self.missing, log=say, questions=c.questions)
    frozen = partition.rest(self.params, partition.MLLM[1:])
    trained = partition.combine(partition.select(self.params, partition.MLLM[1:]), trained)
    per_scenario = {kind: self.exact_match(trained, frozen, test_split.scenario(kind), c.eval.test_samples)
                    for kind in data.SCENARIOS}
    n = partition.count(self.params)
    results = {"task": MLLM, "dataset": c.dataset, "questions": c.questions, "method": method_name(c),
               "metric": METRIC, "checkpoint_step": step,
               "best_validation": None if record is None else record.best_metric,
               "missing": c.missing.to_dict(), "test": per_scenario,
               "parameters": {"frozen": n["backbone"], "adapter": n["adapter/decoder"], "projector": n["projector"]}}
    if train_seconds is not None:
      results["train_seconds"] = train_seconds
    writer.write(step, "test", {k: v[METRIC] for k, v in per_scenario.items()})
    asked = "" if c.questions == "easy_vqa" else f", {c.questions} questions"
    table = (f"test (easy-VQA MLLM{asked}, {results['method']}, checkpoint of step {step}; missing {c.missing.type} "
             f"{c.missing.rate}):\n" + evaluation.format_table(per_scenario, METRIC))
    return results, table


def make_generate(graphdef: nnx.GraphDef, tokenizer):
  """The jitted greedy answers of the MLLM of `graphdef`: (trained, frozen, Batch) -> tokens [B, MAX_NEW_TOKENS]."""

  @jax.jit
  def generate(trained, frozen, batch):
    model = adapters.join(graphdef, partition.combine(frozen, trained))
    return model.generate(batch, MAX_NEW_TOKENS, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)

  return generate


def _per_process(global_batch: int) -> int:
  per_process, remainder = divmod(global_batch, jax.process_count())
  if remainder:
    raise ValueError(f"batch {global_batch} is not divisible by the {jax.process_count()} processes.")
  return per_process


def _adamw(schedule, weight_decay: float):
  return optim.adamw(schedule, weight_decay, b1=0.9, b2=0.999)


def check(config: ml_collections.ConfigDict):
  """Every check of an MLLM config that reads no data or weights; its missing setting and adapter method."""
  config_lib.check_minimums(config, MINIMUMS)
  for stage in ("stage1", "stage2"):
    job_lib.check_optimizer(config[stage], stage)
  missing = data.Missing(**config.missing)
  try:
    method = adapters.from_config(config.adapter.to_dict())
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.adapter: {e}") from e
  if config.projector not in mllm_lib.PROJECTORS:
    raise ValueError(f"config.projector={config.projector!r}: use one of {mllm_lib.PROJECTORS}.")
  if config.image_tokens not in mllm_lib.IMAGE_TOKENS:
    raise ValueError(f"config.image_tokens={config.image_tokens!r}: use one of {mllm_lib.IMAGE_TOKENS}.")
  if config.questions not in vqa.QUESTIONS:
    raise ValueError(f"config.questions={config.questions!r}: use one of {vqa.QUESTIONS}.")
  if config.stage1.data not in STAGE1_DATA:
    raise ValueError(f"config.stage1.data={config.stage1.data!r}: use one of {tuple(STAGE1_DATA)}.")
  return missing, method


def build(config: ml_collections.ConfigDict, workdir: Path | None) -> Answering:
  """The MLLM of config `c`: the embedded (or given) CLIP vision tower and LM, both frozen, with adapters on the LM
  and a projector; its tokenizer; the train and validation splits. `workdir` None: no folder is written (eval)."""
  c = config
  missing, method = check(c)
  if workdir is not None:
    check_writable(workdir / "checkpoints", "--workdir")
  job_lib.check_embedded_cache(c.backbone, embedded, "backbone")
  job_lib.check_embedded_cache(c.lm, embedded_lm, "lm")
  # The splits before the models, whose first build pre-trains them (minutes): the batches are checked against them.
  # Stage 1 aligns on easy-VQA's own train split whatever stage 2 is asked (config.questions).
  train, validation = (vqa.load(name, c.data_dir, missing, log=say, questions=c.questions)
                       for name in ("train", "validation"))
  aligned = train if c.questions == "easy_vqa" else vqa.load("train", c.data_dir, missing, log=say)
  splits = {"stage1": STAGE1_DATA[c.stage1.data](aligned), "stage2": train, "validation": validation}
  job_lib.check_batch_size("stage1.batch_size", c.stage1.batch_size, len(splits["stage1"]), splits["stage1"].name)
  job_lib.check_batch_size("batch_size", c.batch_size, len(train), train.name)
  clip = backbone_lib.load(c.backbone, 77, c.data_dir, mesh=None, rules=sharding.REPLICATED_RULES, log=say)
  lm_dir = embedded_lm.ensure(c.lm.cache_dir, c.data_dir, c.lm.seed, log=say) if c.lm.path == embedded_lm.NAME \
      else hf.resolve(c.lm.path)
  lm, tokenizer = embedded_lm.load(lm_dir)
  lm_identity = {"source": str(c.lm.path), "sha256": backbone_lib.weights_hash(llama_hf.to_hf_tensors(lm))}
  method.attach(lm, rngs=nnx.Rngs(c.seed))
  model = mllm_lib.MLLM(clip.model.vision_model, lm, c.projector, c.image_tokens, rngs=nnx.Rngs(c.seed + 1))
  prep = data.Preprocessing(image=clip.image_processing, missing_image="white")
  identity = {"source": f"{clip.identity['source']} + {lm_identity['source']}",
              "sha256": clip.identity["sha256"][:32] + lm_identity["sha256"][:32], "clip": clip.identity,
              "lm": lm_identity}
  mesh = sharding.make_mesh((jax.device_count(), 1), ("data", "fsdp"))
  # The vision tower's features are computed on this process's first device (every process computes them all).
  local_graphdef, local_state = nnx.split(model)
  encode = jax.jit(lambda state, pixels: nnx.merge(local_graphdef, state).image_features(pixels))
  graphdef, params = adapters.split(model)
  return Answering(c, mesh, graphdef, sharding.replicate(params, mesh), tokenizer, prep, identity, missing, splits,
                   lambda pixels: np.asarray(encode(local_state, pixels)), make_generate(graphdef, tokenizer))


def evaluate_run(workdir: str | Path, checkpoint: str | Path | None = None, missing: dict | None = None,
                 config_overrides=()) -> dict:
  """eval.py on an MLLM workdir: the stage-1 projector, then the best (or the given) stage-2 checkpoint, tested
  per missing scenario."""
  workdir = Path(workdir) if workdir else Path(checkpoint).parent.parent
  # As saved, with the keys added since filled in as the run computed them (checkpoint_lib.saved_config).
  saved = checkpoint_lib.saved_config({"config": job_lib.read_config_file(workdir)})
  c = config_lib.from_json(json.dumps(saved))
  config_lib.apply_overrides(c, list(config_overrides))
  with c.unlocked():
    for key, value in (missing or {}).items():
      config_lib.override(c.missing, key, value)
  task = build(c, None)
  replicated = NamedSharding(task.mesh, PartitionSpec())
  for stage in task.stages():
    ckpt = checkpoint_lib.Checkpointer(workdir / stage.directory, read_only=True)
    if not stage.validates:
      step = ckpt.latest_step()
    else:
      step = int(Path(checkpoint).name) if checkpoint else ckpt.steps_best_first(METRIC, None)[0]
    target = sharding.abstract(partition.select(task.params, stage.trained), replicated)
    task.params = partition.combine(task.params, ckpt.restore_params(step, target))
    ckpt.close()
  writer = MetricWriter(workdir)
  results, table = task.test(partition.select(task.params, stage.trained), step, writer, None, None)
  writer.close()
  say(table)
  return results
