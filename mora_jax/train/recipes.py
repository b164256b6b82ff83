"""The run configs: one base (docs/protocol.md and docs/method.md defaults) and the published per-dataset recipes.

`configs/<dataset>_<method>.py` files are one call each into `get`, so every recipe number lives here once.
"""

import dataclasses

import ml_collections

from mora_jax import adapters
from mora_jax.adapters import partition, registry
from mora_jax.data import vqa

# docs/method.md "Published configs" (CLIP ViT-B/16, start_layer 10, dropout 0.1). `adapter` holds the fields every
# adapter method takes; `method` the fields of one method only. LoRA and DoRA use the same targets, rank,
# schedule and weight decay (the paper compares them on the same pipeline) with PEFT's alpha; MokA (two-tower)
# too, with the MokA authors' alpha (16), visual-text lambda (0.05) and dropout (0.05), docs/method.md.
PUBLISHED = {
    "mm_imdb": dict(adapter=dict(targets=("q_proj", "k_proj"), rank=4), method={"mora": dict(alpha=0.001)},
                    epochs=20, batch_size=256, weight_decay=0.02),
    "upmc_food101": dict(adapter=dict(targets=("q_proj", "v_proj"), rank=4), method={"mora": dict(alpha=0.01)},
                         epochs=20, batch_size=256, weight_decay=0.02),
    "hateful_memes": dict(adapter=dict(targets=("k_proj", "v_proj"), rank=8), method={"mora": dict(alpha=0.1)},
                          epochs=5, batch_size=16, weight_decay=0.1),
    # The embedded default (train.py with no arguments, minutes on a CPU): the project's small CLIP
    # pre-trained on easy-VQA train images (mora_jax/backbones/embedded.py; 4 layers per tower, 24 text positions).
    "easy_vqa": dict(adapter=dict(targets=("q_proj", "v_proj"), rank=4, start_layer=1),
                     method={"mora": dict(alpha=0.01)}, epochs=1, batch_size=64, weight_decay=0.02,
                     path="embedded", max_length=24,
                     # The prompt methods in the study's run settings (above), prompting all 4 layers.
                     prompting=dict(adapter=dict(depth=4), epochs=1, batch_size=64, decay="cosine")),
}
# The prompt baselines (MMP, DCP; docs/prompts.md) take the DCP code's recipe, the same for its three datasets:
# prompts in the first 6 layers (DCP: 36 tokens a layer; MMP: 16, MAP's code's; each config's default), AdamW
# (b1 0.9, b2 0.98, eps 1e-8) at lr 1e-2 with weight decay 0.02, batch 256 for 20 epochs, linear warm-up over the
# first 10% of the steps then linear decay to 0, and the all-ones dummy image after normalisation. A dataset's
# `prompting` entry overrides parts of it.
PROMPT_METHODS = ("mmp", "dcp")
PROMPTING = dict(adapter=dict(depth=6), epochs=20, batch_size=256, weight_decay=0.02, decay="linear",
                 missing_image="ones_after_norm")


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.dataset = "easy_vqa"
  c.data_dir = "data"  # prepared TFDS files and cached missing tables
  c.manual_dir = ""  # the raw downloads of mm_imdb / upmc_food101 / hateful_memes (see their instructions)
  c.one_sample_per_text = True  # MM-IMDb: one sample per plot, in training and evaluation
  # dataset="manifest": your own data, one row per sample in a .jsonl or .csv `path` (docs/own_data.md).
  # image_root: where relative image paths start ("" = the manifest's folder). split_fractions (train,
  # validation, test) and seed split a manifest without a "split" column. classes: the class list in the head's
  # order (() = the sorted names in the manifest). metric: the selection metric ("" = accuracy, or f1_macro
  # when multi-label; also auroc for two classes, f1_micro, f1_samples).
  c.manifest = ml_collections.ConfigDict(dict(path="", image_root="", split_fractions=(0.8, 0.1, 0.1), seed=0,
                                              classes=(), metric=""))
  c.missing = ml_collections.ConfigDict(dict(rate=0.7, type="both", seed=0))
  # Image size, crop, resample, mean and std come from the backbone checkpoint's preprocessor_config.json.
  # transparency: "drop" (the authors' convert("RGB")) or "white" (transformers composites onto white).
  c.preprocessing = ml_collections.ConfigDict(dict(max_length=77, missing_image="white",
                                                   rewrite_position_75=True, transparency="drop"))
  # path: a Hugging Face id, a local checkpoint directory, or "embedded". random_preset (with path ""): a randomly
  # initialised CLIP of that preset whose text side fits a byte-level tokenizer (no download; smoke runs).
  # dtype of the frozen backbone and of the compute: "auto" = bfloat16 on GPU/TPU, float32 on CPU.
  # cache_dir: where path="embedded" (the project's small pre-trained CLIP) is built on first use.
  c.backbone = ml_collections.ConfigDict(dict(path="openai/clip-vit-base-patch16", random_preset="", seed=0,
                                              dtype="auto", cache_dir="~/.cache/mora_jax"))
  c.adapter = adapter("mora")
  # The head on concat(image, text features): "linear" (docs/method.md) or "mlp" (one GELU layer of `hidden` units).
  c.head = ml_collections.ConfigDict(dict(type="linear", hidden=256))
  # A fresh run's initial adapters (and head, if the classes and head match): another run's workdir or checkpoint
  # step directory, or a PEFT adapter directory. "" = the methods' own init. See mora_jax/train/init_from.py.
  c.init_from = ""
  # decay after the warm-up: "cosine" (MoRA's recipe) or "linear" (the DCP code's).
  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-2, weight_decay=0.02, b1=0.9, b2=0.98, eps=1e-8, warmup_fraction=0.1, decay="cosine",
      lr_mults={name: 1.0 for name in partition.CLASSIFIER[1:]},
      wd_mults={name: 1.0 for name in partition.CLASSIFIER[1:]}))
  c.epochs = 20
  c.batch_size = 256  # global, per optimizer step (accum_steps micro-batches of batch_size / accum_steps)
  c.accum_steps = 1
  c.max_steps = 0  # > 0: stop after this many steps (the schedule still spans `epochs`); smoke runs and tests
  c.seed = 42
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))  # -1: all remaining devices
  c.eval = ml_collections.ConfigDict(dict(batch_size=256, patience=20))
  c.checkpoint = ml_collections.ConfigDict(dict(keep=2, every_steps=0))  # 0: at the end of every epoch only
  c.log_every_steps = 50
  # Batches assembled at once (Grain threads), and image-decoding worker processes: -1 = one per core (none on 1-2
  # cores, where the threads decode faster), 0 = none (decoded in the main process). Neither changes a batch.
  c.data_threads = 2
  c.data_workers = -1
  # Every image decoded once into memory-mapped files under data_dir (mora_jax/data/pixel_store.py): "auto"
  # (when it fits the disk), "on" or "off" (decode every epoch).
  c.pixel_store = "auto"
  c.skip_corrupt = False  # True: a corrupt image's sample is masked out and counted instead of stopping the run
  # The frozen layers' activations computed once (mora_jax/train/prefix_cache.py): "auto" (when more than one
  # epoch is trained), "on" or "off"; stored as "auto" (the backbone's compute dtype), "float32" or "bfloat16",
  # on the devices up to prefix_cache_device_gb, in host memory up to prefix_cache_memory_gb per process, beyond
  # them in files under data_dir.
  c.prefix_cache = "auto"
  c.prefix_cache_dtype = "auto"
  c.prefix_cache_memory_gb = 8.0
  # Caches kept on the devices first (replicated; batches gathered there, nothing transferred per step), up to
  # this many GiB per device; -1: half the device's free memory where it reports it (GPU, TPU), none on CPU.
  c.prefix_cache_device_gb = -1.0
  return c


def adapter(method: str, **values) -> ml_collections.ConfigDict:
  """{"method": method, <every field of the method's adapter config>}; "linear" has no fields."""
  return ml_collections.ConfigDict(adapters.to_config(adapters.from_config({"method": method, **values})))


def get(dataset: str, method: str) -> ml_collections.ConfigDict:
  """The published recipe of `dataset` for `method` on top of `base()`. Every recipe value is used: one that
  nothing reads is an error, not silently dropped."""
  if dataset not in PUBLISHED:
    raise ValueError(f"no recipe for dataset {dataset!r}; known: {sorted(PUBLISHED)}.")
  recipe = dict(PUBLISHED[dataset])
  prompting = {**PROMPTING, **recipe.pop("prompting", {})}
  if method in PROMPT_METHODS:  # the adapter fields and run settings of the prompting recipe replace the rest
    for key in ("epochs", "batch_size", "weight_decay"):
      recipe[key] = prompting.pop(key)
    recipe["adapter"], recipe["method"] = {}, {method: prompting.pop("adapter")}
  c = base()
  c.dataset = dataset
  c.epochs, c.batch_size = recipe.pop("epochs"), recipe.pop("batch_size")
  c.optim.weight_decay = recipe.pop("weight_decay")
  if method in PROMPT_METHODS:
    c.optim.decay = prompting.pop("decay")
    c.preprocessing.missing_image = prompting.pop("missing_image")
  if "path" in recipe:
    c.backbone.path = recipe.pop("path")
    c.preprocessing.max_length = recipe.pop("max_length")
  shared, per_method = recipe.pop("adapter"), recipe.pop("method")
  unknown = sorted(set(per_method) - set(registry.METHODS))
  if recipe or unknown:
    raise ValueError(f"recipe {dataset!r}: nothing reads {sorted(recipe) + unknown}.")
  # The linear probe has no adapter, so no adapter field applies to it.
  c.adapter = adapter(method) if method == registry.LINEAR_PROBE else adapter(
      method, **shared, **per_method.get(method, {}))
  c.eval.batch_size = max(c.batch_size, 256)
  return c


def mllm(method: str) -> ml_collections.ConfigDict:
  """The easy-VQA MLLM run of `method`: "moka", "lora" or "moka_lambda0"."""
  # The MokA authors' settings (rank 4, alpha 16, dropout 0.05; MokA's own defaults: lambda 0.05, tau sqrt(r), scale
  # after B) on every projection of every decoder layer.
  decoder = dict(targets=adapters.common.DECODER_TARGETS, start_layer=0, rank=4, alpha=16.0, dropout=0.05)
  methods = {"moka": ("moka", decoder), "lora": ("lora", decoder), "moka_lambda0": ("moka", {**decoder, "lam": 0.0})}
  if method not in methods:
    raise ValueError(f"no MLLM recipe {method!r}; known: {sorted(methods)}.")
  c = ml_collections.ConfigDict()
  c.task = "mllm"
  c.dataset = "easy_vqa"
  # What stage 2 and the test ask: "easy_vqa" (the dataset's own questions) or "match" (yes/no questions naming a
  # colour and a shape together, which need the question and the image together: mora_jax.data.vqa.QUESTIONS).
  c.questions = "easy_vqa"
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
  # What the image tokens are: "patches" (the penultimate layer's patch tokens, LLaVA's) or "patches+class" (and the
  # last layer's class token); mora_jax.adapters.mllm.IMAGE_TOKENS. docs/mllm.md has the ablation behind the
  # defaults here and in stage1.
  c.image_tokens = "patches+class"
  adapter_method, values = methods[method]
  c.adapter = adapter(adapter_method, **values)
  c.layout = ml_collections.ConfigDict(dataclasses.asdict(vqa.Layout()))
  # data: "captions" (LLaVA's kind: "a red circle" after the image) or "questions" (a what-colour and a what-shape
  # question per image; answering.STAGE1_DATA).
  c.stage1 = ml_collections.ConfigDict(dict(steps=600, batch_size=64, lr=1e-2, data="questions"))
  c.stage2 = ml_collections.ConfigDict(dict(train_projector=True, lr=2e-3, weight_decay=0.0, warmup_fraction=0.03))
  c.epochs = 1
  c.batch_size = 64
  c.max_steps = 0
  c.seed = 42
  c.eval = ml_collections.ConfigDict(dict(batch_size=512, validation_samples=1000, test_samples=0))
  c.checkpoint = ml_collections.ConfigDict(dict(keep=2, every_steps=0))
  c.log_every_steps = 50
  return c
