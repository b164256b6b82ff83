"""Train-step time per adapter method, the PyTorch MoRA peer, merged-MoRA inference and MokA's forward
overhead over LoRA, in one run.

    python bench/adapters.py                          # tiny and ViT-B/16
    python bench/adapters.py --configs tiny --repeats 2

A train step is the library's (mora_jax.train.step): forward + backward + AdamW update on a batch of (image, 77-token text, label), the Food-101
MoRA recipe's targets (q, v; layers >= 10, or >= 1 on the 2-layer tiny config; rank 4; 101 classes).
The PyTorch peer is transformers.CLIPModel with the same projections replaced by MoRA layers written from
docs/method.md (materialized form), AdamW over the trainable parameters only, eager mode.
MokA (two-tower) runs with every text token a key (the batch has no missing text), so its cross term is
always computed. Ratios are printed relative to our LoRA step and to the peer.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from mora_jax import adapters, clip, sharding
from mora_jax.adapters import optim
from mora_jax.data.inputs import Normalized
from mora_jax.train import step as step_lib
from harness import interleaved_best_seconds, parse_args, random_batch, random_checkpoint

DEFAULT_BATCH = {"tiny": 32, "ViT-B/16": 8}
NUM_CLASSES = 101


def jax_step(backbone_dir, adapter, data, dtype=jnp.float32):
  """A no-argument call running the library's jitted train step (mora_jax.train.step) on one batch, the
  state carried between calls; `.compiled` is the compiled step (memory and FLOP analysis)."""
  clf = adapters.build_classifier(clip.from_pretrained(backbone_dir, dtype), adapter, NUM_CLASSES)
  graphdef, params = adapters.split(clf)
  mesh = sharding.make_mesh((jax.device_count(), 1), ("data", "fsdp"))
  schedule = step_lib.lr_schedule(1e-3, 1000, 0.1)
  tx = optim.adamw(schedule, 0.02)
  trainable = adapters.trainable(params)
  state = sharding.replicate({"params": trainable, "opt": tx.init(trainable), "step": jnp.int32(0),
                              "rng": jax.random.PRNGKey(0)}, mesh)
  frozen = {"backbone": params["backbone"]}
  shardings = {"backbone": sharding.state_shardings(params["backbone"], mesh, sharding.REPLICATED_RULES)}
  train_step = step_lib.make_train_step(graphdef, tx, schedule, step_lib.classifier_loss(False), mesh, shardings)
  pixels, ids, mask, labels = data
  batch = {"inputs": Normalized(pixels, ids.astype(np.int32), mask.astype(np.int32), np.zeros(len(labels), np.int8)),
           "label": labels.astype(np.int32), "valid": np.ones(len(labels), bool)}
  batch = jax.device_put(jax.tree.map(lambda v: v[None], batch), sharding.batch_sharding(mesh, micro_axis=True))
  holder = {"state": state}

  def run():
    holder["state"], metrics = train_step(holder["state"], frozen, batch)
    jax.block_until_ready(metrics)

  run.compiled = train_step.lower(state, frozen, batch).compile()
  return run


def jax_inference(backbone_dir, adapter, data, merge: bool = True):
  """A no-argument call computing logits: adapter None -> plain backbone, else the classifier, merged if
  `merge` (and the method can be merged)."""
  clf = adapters.build_classifier(clip.from_pretrained(backbone_dir), adapter, NUM_CLASSES)
  if adapter is not None and merge:
    clf = adapters.merge(clf)
  graphdef, state = nnx.split(clf)
  forward = jax.jit(lambda state, *x: nnx.merge(graphdef, state)(*x))
  pixels, ids, mask, _ = data
  return lambda: jax.block_until_ready(forward(state, pixels, ids, mask))


class TorchMoRA(torch.nn.Module):
  """docs/method.md's layer in PyTorch layout (materialized), around a frozen nn.Linear."""

  def __init__(self, base: torch.nn.Linear, a_c, b_c, tower: str, rank: int, alpha: float, dropout: float):
    super().__init__()
    self.base, self.a_c, self.b_c, self.tower, self.alpha = base, a_c, b_c, tower, alpha
    d = base.weight.shape[0]
    self.a_p = torch.nn.Parameter(torch.randn(d, rank) / rank**0.5)
    self.b_p = torch.nn.Parameter(torch.zeros(rank, d))
    norm = base.weight.norm(dim=0, keepdim=True).detach()
    self.m_c = torch.nn.Parameter(norm.clone())
    self.m_p = torch.nn.Parameter(norm.clone())
    self.dropout = torch.nn.Dropout(dropout)

  def forward(self, x):
    w = self.base.weight
    a, b = self.a_c, self.b_c
    s = a @ (b.T @ b) @ a.T if self.tower == "text" else b @ (a.T @ a) @ b.T
    n_c = w + self.alpha * s.T
    n_p = w + self.alpha * (self.a_p @ self.b_p).T
    v_c = n_c / n_c.norm(dim=0, keepdim=True).clamp(min=1e-5)
    v_p = n_p / n_p.norm(dim=0, keepdim=True).clamp(min=1e-5)
    return torch.nn.functional.linear(self.dropout(x), self.m_c * v_c + self.m_p * v_p, self.base.bias)


def torch_step(hf_model, cfg: clip.CLIPConfig, mora: adapters.MoRAConfig, data):
  """A no-argument call running one PyTorch train step of the MoRA peer."""
  for p in hf_model.parameters():
    p.requires_grad_(False)
  commons = {}
  for tower, model in (("vision", hf_model.vision_model), ("text", hf_model.text_model)):
    for index in range(mora.start_layer, len(model.encoder.layers)):
      if index not in commons:
        r = mora.rank
        commons[index] = (torch.nn.Parameter(torch.randn(cfg.text.hidden_size, r) / r**0.5),
                          torch.nn.Parameter(torch.randn(cfg.vision.hidden_size, r) / r**0.5))
      attn = model.encoder.layers[index].self_attn
      for name in mora.targets:
        setattr(attn, name, TorchMoRA(getattr(attn, name), *commons[index], tower, mora.rank, mora.alpha,
                                      mora.dropout))
  head = torch.nn.Linear(2 * cfg.projection_dim, NUM_CLASSES)
  hf_model.train()
  trainable = [p for p in hf_model.parameters() if p.requires_grad] + list(head.parameters())
  opt = torch.optim.AdamW(trainable, lr=1e-3, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.02)
  pixels, ids, mask, labels = (torch.tensor(a) for a in data)

  def run():
    image = hf_model.get_image_features(pixel_values=pixels).pooler_output
    text = hf_model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
    loss = torch.nn.functional.cross_entropy(head(torch.cat([image, text], -1)), labels)
    opt.zero_grad()
    loss.backward()
    opt.step()

  return run


def bench_config(name: str, batch_size: int, repeats: int) -> dict:
  cfg = clip.preset(name)
  start = min(10, cfg.vision.num_hidden_layers - 1, cfg.text.num_hidden_layers - 1)
  recipe = adapters.MoRAConfig(targets=("q_proj", "v_proj"), start_layer=start, rank=4, alpha=0.01, dropout=0.1)
  methods = {
      "none": None,
      "lora": adapters.LoRAConfig(targets=recipe.targets, start_layer=start, rank=4),
      "dora": adapters.DoRAConfig(targets=recipe.targets, start_layer=start, rank=4),
      "mora-materialized": dataclasses.replace(recipe, form="materialized"),
      "mora-fused": dataclasses.replace(recipe, form="fused"),
      "moka": adapters.MokAConfig(targets=recipe.targets, start_layer=start, rank=4, dropout=0.1),
  }
  data = random_batch(cfg, batch_size, NUM_CLASSES)
  torch.manual_seed(0)
  with random_checkpoint(cfg) as (hf_model, tmp):
    steps = {m: jax_step(tmp, a, data) for m, a in methods.items()}
    # Interleaved timing: every method, the peer and both inference variants are timed in turn in each round,
    # so load drift on the shared cores hits them alike. Merged and plain inference run the same computation.
    steps["peer"] = torch_step(hf_model, cfg, recipe, data)
    steps["plain"] = jax_inference(tmp, None, data)
    steps["merged"] = jax_inference(tmp, recipe, data)
    steps["lora-forward"] = jax_inference(tmp, methods["lora"], data, merge=False)
    steps["moka-forward"] = jax_inference(tmp, methods["moka"], data, merge=False)
    seconds = dict(zip(steps, interleaved_best_seconds(list(steps.values()), repeats)))
  return dict(config=name, batch=batch_size, step={m: seconds[m] for m in methods}, peer=seconds["peer"],
              plain=seconds["plain"], merged=seconds["merged"], lora_forward=seconds["lora-forward"],
              moka_forward=seconds["moka-forward"])


def main():
  args = parse_args(__doc__, DEFAULT_BATCH, repeats=3)
  print("| config | batch | method | train step (ms) | / lora step | PyTorch MoRA peer / ours |")
  print("|---|---|---|---|---|---|")
  rows = [bench_config(n, args.batch or DEFAULT_BATCH.get(n, 8), args.repeats) for n in args.configs]
  for r in rows:
    for method, seconds in r["step"].items():
      print(f"| {r['config']} | {r['batch']} | {method} | {1e3 * seconds:.1f} | "
            f"{seconds / r['step']['lora']:.2f}x | {r['peer'] / seconds:.2f}x |")
    print(f"| {r['config']} | {r['batch']} | PyTorch MoRA peer | {1e3 * r['peer']:.1f} | "
          f"{r['peer'] / r['step']['lora']:.2f}x | 1.00x |")
  print("\n| config | batch | merged MoRA inference / plain backbone | MokA forward / LoRA forward (unmerged) |")
  print("|---|---|---|---|")
  for r in rows:
    print(f"| {r['config']} | {r['batch']} | {r['merged'] / r['plain']:.3f}x | "
          f"{r['moka_forward'] / r['lora_forward']:.3f}x |")


if __name__ == "__main__":
  main()
