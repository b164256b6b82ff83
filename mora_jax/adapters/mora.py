"""MoRA (arXiv 2511.06225): modality-common low-rank factors coupled through rank-space Gram matrices,
plus modality-specific DoRA-style factors, exactly as docs/method.md (the authors' code).

Layout: docs/method.md writes a projection as y = x W^T + b with W [out, in]; our kernel is K = W^T [in, out]. For the
square projections MoRA adapts, every update of W (alpha * S^T, alpha * P^T) becomes K + alpha * S and
K + alpha * P here, and docs/method.md's per-input-column norms of W are per-row norms of K. A_p [in, r], B_p [r, out]
and the common factors keep docs/method.md's shapes, so parameters compare one to one with the PyTorch code.

The ablations (MoRAConfig.specific, MoRAConfig.gram; docs/method.md "Ablations") are our definitions of the paper's
three ablations: the authors' code has no switches for them.
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from mora_jax.adapters import partition
from mora_jax.adapters.common import ATTENTION_TARGETS, AdapterConfig, Target, call_rngs, dropout
from mora_jax.models.modeling import Call, Linear
from mora_jax.models.config import CLIPConfig

_NORM_FLOOR = 1e-5  # docs/method.md: V = N / max(colnorm(N), 1e-5)
GRAMS = ("cross", "none", "learned")


@dataclasses.dataclass(frozen=True)
class MoRAConfig(AdapterConfig):
  """MoRA hyper-parameters. `rank` is r_c = r_vision = r_text, as in every published config."""
  name: ClassVar[str] = "mora"
  alpha: float = 0.01
  # "materialized" (W' then one matmul) or "fused" (low-rank, no d x d temporaries). Materialized is the
  # default: with more tokens per step than the width d, the fused form's activation-sized elementwise work
  # costs more than the d x d weight it avoids (bench/adapters.py; docs/benchmarks.md).
  form: str = "materialized"
  # "published": m_c = m_p = ||W||_col at init, so W' = W + ||W|| (W + alpha S) / ||W + alpha S|| per column. At
  # the published alpha and rank alpha S is not small against W (docs/mora_init.md), so W' is near
  # W + ||W|| S / ||S||: W plus a random direction of W's size, not 2W. "identity_start": W' = W at init.
  variant: str = "published"
  # Ablations (docs/method.md "Ablations"; our definitions, the authors' code has none). specific=False: no
  # modality-specific path (no A_p, B_p, m_p), W' = m_c V_c. gram: the rank-space matrix G in S = U G U^T (U the
  # tower's own common factor): "cross" (MoRA) the Gram of the other tower's factor; "none" a constant, the
  # expectation of that Gram at init, so no coupling and the same update size; "learned" one trained r x r G per
  # layer index (adapter/common), shared by both towers.
  specific: bool = True
  gram: str = "cross"

  def __post_init__(self):
    super().__post_init__()
    if not set(self.targets) <= set(ATTENTION_TARGETS):
      raise ValueError(f"MoRA adapts square attention projections only ({ATTENTION_TARGETS}); got {self.targets}.")
    if self.form not in ("fused", "materialized"):
      raise ValueError(f"MoRAConfig.form={self.form!r}: use 'fused' or 'materialized'.")
    if self.variant not in ("published", "identity_start"):
      raise ValueError(f"MoRAConfig.variant={self.variant!r}: use 'published' or 'identity_start'.")
    if not isinstance(self.specific, bool):
      raise ValueError(f"MoRAConfig.specific={self.specific!r}: use True or False.")
    if self.gram not in GRAMS:
      raise ValueError(f"MoRAConfig.gram={self.gram!r}: use 'cross', 'none' or 'learned'.")
    if not self.specific and self.variant == "identity_start":
      raise ValueError("MoRAConfig.variant='identity_start' needs specific=True (W' = W at init comes from the "
                       "specific path; without it m_c = 0 would make W' = 0).")

  def adapt(self, base: Linear, target: Target, shared: nnx.Dict, model: CLIPConfig, *,
            rngs: nnx.Rngs) -> nnx.Module:
    """One modality-common pair per layer index (in `shared`), read by both towers and every target there."""
    key = str(target.layer)
    if key not in shared:
      shared[key] = MoRACommon(model.text.hidden_size, model.vision.hidden_size, self.rank, self.gram, rngs=rngs)
    return MoRALinear(base, shared[key], target.tower, self, rngs=rngs)


def _normal(key, shape, std):
  return std * jax.random.normal(key, shape, jnp.float32)


def gram_at_init(d: int, rank: int) -> float:
  """E[F^T F] = (d / r) I for a common factor F [d, r] drawn N(0, 1/r) (MoRACommon): d terms of variance 1/r on
  the diagonal, mean 0 off it. The scale of the cross Gram that the ablations keep (MoRAConfig.gram)."""
  return d / rank


class MoRACommon(nnx.Module):
  """One layer index's modality-common pair, read by both towers and every adapted projection there; with
  gram="learned" also the r x r matrix G both towers use."""

  def __init__(self, d_text: int, d_vision: int, rank: int, gram: str = "cross", *, rngs: nnx.Rngs):
    self.A_c = partition.Common(_normal(rngs.params(), (d_text, rank), rank**-0.5))
    self.B_c = partition.Common(_normal(rngs.params(), (d_vision, rank), rank**-0.5))
    self.gram = gram
    if gram == "learned":
      # G0 = the mean of the two cross Grams' expectations, ((d_text + d_vision) / 2r) I: the update starts at the
      # cross form's scale (exactly when the widths are equal; on ViT-B/16 the text update is 640/768 and the
      # vision one 640/512 of it). One G serves both towers, so it cannot match each tower's own Gram at once.
      g0 = (gram_at_init(d_text, rank) + gram_at_init(d_vision, rank)) / 2
      self.G = partition.Common(g0 * jnp.eye(rank, dtype=jnp.float32))

  def factors(self, tower: str) -> tuple[jax.Array, jax.Array]:
    """(U, G) with S = U G U^T: the tower's own factor, and (gram="cross") the Gram matrix of the other tower's,
    (gram="learned") the learned G, or (gram="none") the cross Gram's expectation at init, (d_other / r) I: a
    constant, so no coupling, and an update of the cross form's size (S = U U^T alone would be r / d_other of it,
    1/192 for the text tower of ViT-B/16 at r = 4)."""
    a, b = self.A_c[...], self.B_c[...]
    if self.gram == "cross":
      return (a, b.T @ b) if tower == "text" else (b, a.T @ a)
    own, other = (a, b) if tower == "text" else (b, a)
    rank = own.shape[1]
    if self.gram == "learned":
      return own, self.G[...]
    return own, gram_at_init(other.shape[0], rank) * jnp.eye(rank, dtype=own.dtype)


def _row_norms(matrix: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(matrix), axis=1))


def _floored(norm_sq: jax.Array) -> jax.Array:
  # max(||.||, 1e-5) written so that the gradient is finite (zero) below the floor.
  return jnp.sqrt(jnp.maximum(norm_sq, _NORM_FLOOR**2))


class MoRALinear(nnx.Module):
  """The frozen Linear it wraps (`base`, which `merge` puts back) with MoRA's effective weight."""

  def __init__(self, base: Linear, common: MoRACommon, tower: str, cfg: MoRAConfig, *, rngs: nnx.Rngs):
    self.base, self.common, self.tower, self.cfg = base, common, tower, cfg
    d_in, d_out = base.kernel.shape
    specific = partition.SPECIFIC[tower]
    if cfg.specific:
      self.A_p = specific(_normal(rngs.params(), (d_in, cfg.rank), cfg.rank**-0.5))
      self.B_p = specific(jnp.zeros((cfg.rank, d_out), jnp.float32))
    col_norm = _row_norms(base.kernel[...].astype(jnp.float32))
    # Published: both magnitudes start at ||W||_col (W' as MoRAConfig.variant says). identity_start: m_c = 0 and
    # m_p = ||W||_col, so W' = ||W|| * W / ||W|| = W exactly (P = 0), and m_c still gets a gradient (V_c != 0).
    # specific=False: m_c = ||W||_col alone, W' = ||W|| N_c / ||N_c|| at init.
    self.m_c = specific(col_norm if cfg.variant == "published" else jnp.zeros_like(col_norm))
    if cfg.specific:
      self.m_p = specific(col_norm)

  def _terms(self):
    """(K, U, G, A_p, B_p); A_p and B_p are None without the specific path."""
    kernel = self.base.kernel[...].astype(jnp.float32)
    u, g = self.common.factors(self.tower)
    if not self.cfg.specific:
      return kernel, u, g, None, None
    return kernel, u, g, self.A_p[...], self.B_p[...]

  def effective_kernel(self) -> jax.Array:
    """W'^T [in, out], materialised (the reference form, and what `merge` writes into the backbone)."""
    kernel, u, g, a_p, b_p = self._terms()
    alpha = self.cfg.alpha
    n_c_mat = kernel + alpha * (u @ g @ u.T)
    c_c = self.m_c[...] / _floored(jnp.sum(jnp.square(n_c_mat), axis=1))
    if not self.cfg.specific:
      return c_c[:, None] * n_c_mat
    n_p_mat = kernel + alpha * (a_p @ b_p)
    c_p = self.m_p[...] / _floored(jnp.sum(jnp.square(n_p_mat), axis=1))
    return c_c[:, None] * n_c_mat + c_p[:, None] * n_p_mat

  def _fused_scales(self, kernel, u, g, a_p, b_p):
    """Per-input scales m/n with the norms from d x r products (docs/method.md's low-rank form); c_p is None
    without the specific path. G need not be symmetric (gram="learned")."""
    alpha = self.cfg.alpha
    kk = jnp.sum(jnp.square(kernel), axis=1)
    ug = u @ g
    s_cross = jnp.sum(ug * (kernel @ u), axis=1)  # <K_j, S_j>
    s_sq = jnp.sum((ug @ (u.T @ u)) * ug, axis=1)  # ||S_j||^2
    n_c = _floored(kk + 2 * alpha * s_cross + alpha**2 * s_sq)
    if not self.cfg.specific:
      return self.m_c[...] / n_c, None
    p_cross = jnp.sum(a_p * (kernel @ b_p.T), axis=1)  # <K_j, P_j>
    p_sq = jnp.sum((a_p @ (b_p @ b_p.T)) * a_p, axis=1)  # ||P_j||^2
    n_p = _floored(kk + 2 * alpha * p_cross + alpha**2 * p_sq)
    return self.m_c[...] / n_c, self.m_p[...] / n_p

  def __call__(self, x: jax.Array, call: Call | None = None) -> jax.Array:
    x = dropout(x, self.cfg.dropout, call_rngs(call))
    bias = 0 if self.base.bias is None else self.base.bias[...]
    if self.cfg.form == "materialized":
      return x @ self.effective_kernel().astype(x.dtype) + bias
    kernel, u, g, a_p, b_p = self._terms()
    c_c, c_p = self._fused_scales(kernel, u, g, a_p, b_p)
    frozen = self.base.kernel[...]
    xc = x * c_c.astype(x.dtype)
    if not self.cfg.specific:
      y = xc.astype(frozen.dtype) @ frozen
      low_rank = ((xc @ u) @ g) @ u.T
      return y + (self.cfg.alpha * low_rank).astype(y.dtype) + bias
    xp = x * c_p.astype(x.dtype)
    y = (xc + xp).astype(frozen.dtype) @ frozen
    low_rank = ((xc @ u) @ g) @ u.T + (xp @ a_p) @ b_p
    return y + (self.cfg.alpha * low_rank).astype(y.dtype) + bias
