"""A finished run as a folder that PyTorch and transformers use alone: the merged CLIP (config.json,
model.safetensors), its processor (tokenizer files, preprocessor_config.json), the head in PyTorch layout
(head.safetensors, head.json) and a model card (README.md) whose snippet classifies an image-text pair.

    out = export.to_hf(job, trainable, "out/food101_mora")   # what eval.py --export_hf runs

MokA cannot be exported: its cross term depends on the input, so there is no merged CLIP to write.
"""

import json
from pathlib import Path

import numpy as np
import safetensors.numpy
from flax import nnx

from mora_jax import adapters, sharding
from mora_jax.console import say
from mora_jax.data import preprocess
from mora_jax.models import hf
from mora_jax.train.job import Job

HEAD_FILE = "head.safetensors"
HEAD_INFO_FILE = "head.json"
CARD_FILE = "README.md"
FEATURES = "concat(image_features, text_features)"  # CLIP's projected features, not L2-normalised
SNIPPET_START = "```python\n"  # the card's first code block is the runnable snippet (tests execute it)


def head_tensors(head: nnx.Module) -> dict[str, np.ndarray]:
  """The head in torch.nn.Linear layout: `weight` [out, in] and `bias` for the linear head; `hidden.*` and
  `output.*` for the MLP head (exact GELU between them)."""
  tensors = {}
  for path, variable in nnx.to_flat_state(nnx.state(head)):
    *modules, leaf = (str(p) for p in path)
    value = np.asarray(sharding.replicated_value(variable.get_value()), np.float32)
    tensors[".".join([*modules, "weight" if leaf == "kernel" else leaf])] = np.array(
        value.T if leaf == "kernel" else value, order="C")
  return tensors


def head_info(job: Job) -> dict:
  """head.json: what the head's outputs mean and what it reads."""
  return {"class_names": list(job.class_names), "multi_label": job.multi_label, "head": job.config.head.type,
          "features": FEATURES, "max_length": job.config.preprocessing.max_length}


def write_head(job: Job, head: nnx.Module, out: Path) -> None:
  """head.safetensors (torch layout, `head_tensors`) and head.json into `out`; every process must call it."""
  tensors = head_tensors(head)
  if sharding.is_main_process():
    out.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(tensors, out / HEAD_FILE, metadata={"format": "pt"})
    (out / HEAD_INFO_FILE).write_text(json.dumps(head_info(job), indent=2) + "\n")


def read_head(directory: Path) -> tuple[dict, dict[str, np.ndarray]] | None:
  """(head.json, the head's arrays in our layout, keyed like nnx's flat state) of an export, or None without one."""
  info, weights = directory / HEAD_INFO_FILE, directory / HEAD_FILE
  if not (info.is_file() and weights.is_file()):
    return None
  ours = {}
  for name, value in safetensors.numpy.load_file(str(weights)).items():
    *modules, leaf = name.split(".")
    ours[".".join([*modules, "kernel" if leaf == "weight" else leaf])] = value.T if leaf == "weight" else value
  return json.loads(info.read_text()), ours


def head_logits_code(head_type: str) -> str:
  """The snippet's lines (inside `logits`) from `features` to the head's output, in torch."""
  if head_type == "linear":
    return "  return features @ head[\"weight\"].T + head[\"bias\"]"
  return ("  hidden = torch.nn.functional.gelu(features @ head[\"hidden.weight\"].T + head[\"hidden.bias\"])\n"
          "  return hidden @ head[\"output.weight\"].T + head[\"output.bias\"]")


def snippet(out: Path, head_type: str) -> str:
  """PyTorch + transformers code that loads `out` and defines `logits(images, texts)`."""
  return f'''import json

import torch
from safetensors.torch import load_file
from transformers import CLIPModel, CLIPProcessor

OUT = "{out}"
model = CLIPModel.from_pretrained(OUT, attn_implementation="eager").eval()
processor = CLIPProcessor.from_pretrained(OUT)
head = load_file(f"{{OUT}}/{HEAD_FILE}")
info = json.load(open(f"{{OUT}}/{HEAD_INFO_FILE}"))


def pooled(output):  # transformers 5 returns an output object, 4.x the features themselves
  return output if torch.is_tensor(output) else output.pooler_output


@torch.no_grad()
def logits(images, texts):
  """PIL images and their texts -> logits [N, classes]."""
  inputs = processor(text=texts, images=[image.convert("RGB") for image in images], return_tensors="pt",
                     padding="max_length", truncation=True, max_length=info["max_length"])
  features = torch.cat([pooled(model.get_image_features(pixel_values=inputs["pixel_values"])),
                        pooled(model.get_text_features(input_ids=inputs["input_ids"],
                                                       attention_mask=inputs["attention_mask"]))], dim=-1)
{head_logits_code(head_type)}
'''


def card(job: Job, out: Path, tested: str | None) -> str:
  """The model card: what was trained on what, the test results (`tested`, markdown) or that it was not
  tested, and how to use it."""
  c = job.config
  adapter = ", ".join(f"{k}={v}" for k, v in sorted(c.adapter.to_dict().items()) if k != "method")
  tested = tested or ("Not tested at export (`eval.py --no_test`); `eval.py --workdir <run>` tests it per "
                      "missing scenario.")
  predict = ("[name for name, p in zip(info[\"class_names\"], torch.sigmoid(scores)[0]) if p > 0.5]"
             if job.multi_label else "info[\"class_names\"][int(scores.argmax(-1)[0])]")
  tuned = ("A frozen CLIP (linear probe: no adapter)" if c.adapter.method == "linear" else
           f"A CLIP whose {c.adapter.method} adapters are merged into its weights")
  long_texts = ("\n- texts longer than 75 tokens: training set position 75 to the pad token (the MoRA authors' "
                "collate), the snippet truncates as transformers does, so such texts can score slightly differently"
                if c.preprocessing.rewrite_position_75 and c.preprocessing.max_length > 75 else "")
  return f"""# {c.dataset} classifier: CLIP + {c.adapter.method}, mora_jax

{tuned} (backbone {job.backbone.identity["source"]}), and a {c.head.type} head on
{FEATURES} (projected, not normalised), trained with mora_jax.

- dataset: {c.dataset} ({len(job.class_names)} classes, {"multi-label" if job.multi_label else "single-label"})
- method: {c.adapter.method} ({adapter or "no adapter options"})
- missing modality: type {c.missing.type}, rate {c.missing.rate}, seed {c.missing.seed} (the run's setting, or
  eval.py's --missing.*); a missing image is an all-white image, a missing text the empty string
- text: {c.preprocessing.max_length} tokens (padded to that length, as in training){long_texts}

## Results

{tested}

## Use in PyTorch (transformers alone)

{SNIPPET_START}{snippet(out, c.head.type)}```

```python
from PIL import Image

scores = logits([Image.open("example.jpg")], ["the text that goes with it"])
print({predict})
```
"""


def to_hf(job: Job, trainable: dict, out_dir: str | Path, tested: str | None = None) -> Path:
  """Writes the export folder (see the module doc): the merge runs in the job's backbone dtype (evaluate_run
  passes a float32 job) and the weights are stored in the source checkpoint's dtype. `tested`: the test
  results for the card, as markdown (None: not tested). MokA raises ValueError (adapters.merge)."""
  merged = adapters.merge(adapters.join(job.graphdef, {"backbone": job.params["backbone"], **trainable}))
  out = hf.save_pretrained(merged.backbone, out_dir, job.backbone.storage_dtype)
  write_head(job, merged.head, out)
  if sharding.is_main_process():
    job.backbone.tokenizer.save_pretrained(str(out))
    (out / hf.PREPROCESSOR_FILE).write_text(
        json.dumps(preprocess.to_preprocessor_config(job.backbone.image_processing), indent=2) + "\n")
    (out / CARD_FILE).write_text(card(job, out.absolute(), tested))
  say(f"exported the merged model to {out}")
  return out
