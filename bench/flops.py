"""Analytic FLOPs of the CLIP classifier: its forward (bench/inference.py) and a MoRA train step (bench/train.py).

Convention, as usual for model FLOPs utilisation: a matmul [m, k] x [k, n] is m*k*n multiply-accumulates (MACs)
and 2*m*k*n FLOPs; elementwise work (activations, softmax, layer norms, dropout, MoRA's column norms), gathers and
concatenations are not counted, except the optimizer's update (a few FLOPs per trainable parameter, stated). The
attention matmuls are counted over the full L x L scores, as computed (the text tower's causal mask skips no
work). Counts are per sample: work done once per step (building the adapted kernels, the update) is divided by
the batch.

A train step of a frozen backbone with MoRA (materialised form, docs/method.md) in layers >= s of a tower:
  forward: the whole classifier, plus each adapted kernel W' built once per step (U G U^T and A_p B_p);
  backward: nothing flows below layer s. Above it every matmul passes the gradient of its input (1x its MACs for
    a frozen projection; 2x for the two attention matmuls, whose operands are both activations). In layer s
    itself the input is a constant, so only operands downstream of an adapted projection get a gradient. Each
    adapted projection adds its weight gradient x^T dy (1x its MACs: W' is materialised, so its gradient is
    d x d) and the backward of building W' (2x the build, per step). The head passes its input and weight
    gradients, each adapted tower's output projection its input gradient;
  update: AdamW, ADAMW_FLOPS_PER_PARAMETER per trainable parameter per step.

tests/test_bench.py checks the forward and train-step counts against the dots jax traces (the tiny preset).
"""

from typing import NamedTuple

from mora_jax import adapters, clip
from mora_jax.adapters import prompts

# Optax's AdamW per parameter: moments 7, bias corrections 2, the scaled step 4, weight decay 2, learning rate and
# apply 2; and the step's accumulated gradient: sum, mean and norm 3.
ADAMW_FLOPS_PER_PARAMETER = 20


class Tower(NamedTuple):
  layers: int
  tokens: int
  width: int
  mlp: int


class StepFlops(NamedTuple):
  """FLOPs per sample of one train step, by part."""
  forward: float
  backward: float
  update: float

  @property
  def total(self) -> float:
    return self.forward + self.backward + self.update


def towers(model: clip.CLIPConfig, text_tokens: int, extra_tokens: int = 0) -> dict[str, Tower]:
  """Both towers' shapes on a batch of images (class token + patches) and `text_tokens`-token texts, with
  `extra_tokens` prompt tokens in every layer."""
  v, t = model.vision, model.text
  return {"vision": Tower(v.num_hidden_layers, v.num_patches + 1 + extra_tokens, v.hidden_size, v.intermediate_size),
          "text": Tower(t.num_hidden_layers, text_tokens + extra_tokens, t.hidden_size, t.intermediate_size)}


def projection_macs(tower: Tower) -> int:
  """One layer's q, k, v, out and MLP projections."""
  return tower.tokens * (4 * tower.width**2 + 2 * tower.width * tower.mlp)


def attention_macs(tower: Tower) -> int:
  """One layer's two attention matmuls: the scores q k^T and their weighted sum of v."""
  return 2 * tower.tokens**2 * tower.width


def tower_macs(tower: Tower) -> int:
  """A pre-LN transformer's MACs per sample."""
  return tower.layers * (projection_macs(tower) + attention_macs(tower))


def dcp_prompt_macs(cfg: prompts.DCPConfig, model: clip.CLIPConfig, text_tokens: int, batch: int) -> float:
  """Per sample: the dynamic prompts' attention of each tower, plus the correlated chain and modal-common maps,
  computed once per missing case per batch, shared over its samples."""
  g, dv, dt = cfg.group, model.vision.hidden_size, model.text.hidden_size
  per_sample = 0
  for width, tokens in ((dv, model.vision.num_patches + 1), (dt, text_tokens)):
    per_sample += 2 * g * width * width + 2 * tokens * width * width + 2 * g * tokens * width
  hidden, common = (dv + dt) // cfg.reduction, dt // cfg.reduction
  chain = cfg.depth * g * (2 * (dv + dt) * hidden + hidden * (dv + dt))
  common_maps = g * (2 * dt * common + common * (dv + dt))
  return per_sample + prompts.CASES * (chain + common_maps) / batch


def forward_macs(model: clip.CLIPConfig, text_tokens: int, num_classes: int,
                 prompt: prompts.PromptConfig | None = None, batch: int = 1) -> float:
  """The classifier's forward per sample: patch embedding, both towers, output projections and linear head.
  None is plain CLIP's computation (and merged MoRA's); a prompt method (MMP, DCP) adds its tokens to every layer
  and DCP the modules that make them (`batch`: the samples that share those computed once per batch)."""
  v = model.vision
  macs = v.num_patches * v.patch_size**2 * v.num_channels * v.hidden_size  # patch embedding
  macs += sum(tower_macs(t) for t in towers(model, text_tokens, prompt.length if prompt else 0).values())
  macs += (v.hidden_size + model.text.hidden_size) * model.projection_dim + 2 * model.projection_dim * num_classes
  if isinstance(prompt, prompts.DCPConfig):
    macs += dcp_prompt_macs(prompt, model, text_tokens, batch)
  return macs


def kernel_build_macs(tower: Tower, other_width: int, mora: adapters.MoRAConfig) -> int:
  """MoRA's materialised kernels of a tower's adapted projections, per step: each builds U G U^T (G the Gram
  matrix of the other tower's common factor, of width `other_width`) and A_p B_p."""
  d, r = tower.width, mora.rank
  per_kernel = r * r * other_width + d * r * r + d * r * d + d * r * d  # G, U G, (U G) U^T, A_p B_p
  return (tower.layers - mora.start_layer) * len(mora.targets) * per_kernel


def first_adapted_layer_backward_macs(tower: Tower, targets: tuple[str, ...]) -> int:
  """Input gradients in layer s: its input is a constant, so only the operands downstream of an adapted
  projection get one (q, k, v never pass theirs on)."""
  q, k, v = ("q_proj" in targets), ("k_proj" in targets), ("v_proj" in targets)
  one_attention_matmul = tower.tokens**2 * tower.width
  attention = one_attention_matmul * (q + k + (q or k) + v)  # d q and d k of q k^T, d weights and d v of weights v
  out_proj = tower.tokens * tower.width**2 if q or k or v else 0
  return attention + out_proj + 2 * tower.tokens * tower.width * tower.mlp  # and the MLP's fc2, fc1


def adapted_tower_backward_macs(tower: Tower, mora: adapters.MoRAConfig) -> int:
  """Layers s.. of a tower: input gradients (the first adapted layer's, then 1x each frozen projection and 2x
  each attention matmul) and the materialised weight gradient x^T dy of every adapted projection."""
  adapted_layers = tower.layers - mora.start_layer
  later = (adapted_layers - 1) * (projection_macs(tower) + 2 * attention_macs(tower))
  weight_gradients = adapted_layers * len(mora.targets) * tower.tokens * tower.width**2
  return first_adapted_layer_backward_macs(tower, mora.targets) + later + weight_gradients


def mora_trainable_parameters(model: clip.CLIPConfig, mora: adapters.MoRAConfig, num_classes: int) -> int:
  """A_p, B_p, m_c, m_p per adapted projection; one common pair A_c, B_c per adapted layer index; the head."""
  shapes = towers(model, text_tokens=0)
  specific = sum((shapes[name].layers - mora.start_layer) * len(mora.targets) * 2 * shapes[name].width
                 * (mora.rank + 1) for name in mora.towers)
  common_layers = max(shapes[name].layers for name in mora.towers) - mora.start_layer
  common = common_layers * (model.vision.hidden_size + model.text.hidden_size) * mora.rank
  return specific + common + (2 * model.projection_dim + 1) * num_classes


def train_step_flops(model: clip.CLIPConfig, mora: adapters.MoRAConfig, text_tokens: int, batch: int,
                     num_classes: int) -> StepFlops:
  """FLOPs per sample of the train step of the classifier with MoRA (module docstring), on `batch` images and
  `text_tokens`-token texts."""
  if not isinstance(mora, adapters.MoRAConfig) or mora.form != "materialized":
    raise ValueError(f"the train-step count models MoRA's materialised form (bench/train.py's recipe); got {mora}.")
  shapes = towers(model, text_tokens)
  other = {"vision": "text", "text": "vision"}
  build = sum(kernel_build_macs(shapes[name], shapes[other[name]].width, mora) for name in mora.towers) / batch
  p = model.projection_dim
  # The head's weight and input gradients, then each adapted tower's output projection's input gradient.
  head = 2 * (2 * p * num_classes) + sum(shapes[name].width for name in mora.towers) * p
  backward = sum(adapted_tower_backward_macs(shapes[name], mora) for name in mora.towers) + 2 * build + head
  update = ADAMW_FLOPS_PER_PARAMETER * mora_trainable_parameters(model, mora, num_classes) / batch
  return StepFlops(2 * (forward_macs(model, text_tokens, num_classes) + build), 2 * backward, update)
