"""Tolerances for comparing two computations of the same quantity after Adam steps.

Two runs of the same update that differ only in float summation order (micro-batches,
meshes, processes, thread counts) produce gradients that agree to rounding: an absolute
error `grad_atol` (about 1e-7 for the tiny models here) plus a relative one `grad_rtol`.
Adam turns a gradient g into the step lr * m / (sqrt(v) + eps). Where |g| >> eps the step
is insensitive to g's relative error; but where a gradient is zero in exact arithmetic
(e.g. the k-projection bias, to which softmax is invariant) the step is lr * noise /
(|noise| + eps): a full +-lr move decided by rounding. The derivative of the step in g is
at most 1/eps, so with eps large against the rounding noise the difference stays bounded:

  |delta param| <= updates * lr * (grad_atol / eps + grad_rtol).

Tests that compare params after Adam steps therefore use optimizers with `ADAM_EPS`
(1e-4, well above fp32 gradient noise and well below the gradients that matter) and take
their tolerance from `adam_param_atol`. With the library default eps = 1e-8 no useful
bound exists: any element with a zero true gradient may differ by 2 * updates * lr.
"""
from __future__ import annotations

import jax
import numpy as np

ADAM_EPS = 1e-4       # Adam's eps in parity tests: bounds the amplification of rounding
GRAD_ATOL = 1e-7      # fp32 gradient rounding of the tiny test models (checked where cheap)
GRAD_RTOL = 1e-4


def adam_param_atol(lr: float, updates: int, grad_atol: float = GRAD_ATOL,
                    grad_rtol: float = GRAD_RTOL, eps: float = ADAM_EPS) -> float:
  """Largest elementwise param difference two rounding-level runs of `updates` Adam steps
  at learning rate `lr` may show (the bound in this module's docstring)."""
  return updates * lr * (grad_atol / eps + grad_rtol)


def max_abs_difference(a, b) -> float:
  """Largest elementwise |a - b| over two pytrees of the same structure."""
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
