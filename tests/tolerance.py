"""Tolerances from the dtype and the magnitudes involved, never from what one machine printed.

Two computations of the same real-number result differ only by rounding when they take different
kernels: another CPU's SIMD width (AVX2, AVX-512, AMX), a GPU's tensor cores, another summation order,
an all-to-all that regroups rows, a fused kernel against the module path.  Standard error analysis
(Higham, *Accuracy and Stability of Numerical Algorithms*, sec. 3.1) bounds each: a sum or dot product
of n terms, in any order, has an absolute error of at most gamma_n * sum|terms|, gamma_n = n*u/(1 - n*u),
u = eps/2 the unit roundoff.  Two such evaluations therefore differ by at most 2*gamma_n*sum|terms|,
about n * eps * magnitude.  A chain of reductions (layer after layer) adds their lengths; a value stored
in a narrower dtype than it was computed in adds one eps of that dtype per rounding.

``bound`` is that worst case.  It is loose (typical rounding errors grow like sqrt(n), not n), so it
holds on every machine, and still far below what a real bug does: a wrong expert, a missing
renormalisation or a dropped scaling factor moves the result by a fraction of its magnitude.

Usage::

    assert_close(got, want, terms=2 * d + seq)           # fp32, magnitude = max|want|
    assert_close(got, want, terms=d, dtype=torch.bfloat16, roundings=2)
"""
from __future__ import annotations

import math
import os

import torch

# Diagnostic only: DESMOE_TOL_MARGIN=10 divides every bound by 10, to see how much room a machine leaves.
MARGIN = float(os.environ.get("DESMOE_TOL_MARGIN", "1"))


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def bound(terms: int, *, dtype: torch.dtype = torch.float32, scale: float = 1.0, roundings: int = 0,
          stored: torch.dtype | None = None) -> float:
    """Worst-case |a - b| for two evaluations of the same result.

    terms: the total length of the reductions on the longest path from inputs to the compared value
    (for a matmul chain, the sum of the inner dimensions); dtype: the dtype the arithmetic accumulates in;
    scale: the magnitude of the summed terms (max |value| of the inputs' products, or of the result when
    the terms do not cancel); roundings, stored: how many times the value passed through the narrower
    storage dtype ``stored`` (e.g. bf16 activations) on the way.
    """
    u = eps(dtype) / 2
    n = max(int(terms), 1)
    gamma = n * u / (1 - n * u)
    storage = roundings * eps(stored or dtype)
    return 2 * (gamma + storage) * scale / MARGIN


def transformer_terms(*, hidden: int, layers: int, seq: int, ffn: int, heads: int = 1, top_k: int = 1,
                      backward: bool = False, tokens: int = 0) -> int:
    """Reduction lengths through a pre-norm transformer's forward: per layer q/k/v (d), scores (d/heads),
    the attention-weighted sum (seq), the output projection (d), router (d), expert in (d) and out (ffn),
    the top-k combine (k); then the LM head (d).  ``backward`` runs the chain again and sums weight
    gradients over ``tokens``."""
    fwd = layers * (4 * hidden + hidden // heads + seq + ffn + top_k) + hidden
    return 2 * fwd + tokens if backward else fwd


def module_terms(module: torch.nn.Module, *, attention: int = 0) -> int:
    """Reduction lengths of every linear map in ``module`` (Linear: in_features; Conv: in/groups x kernel),
    plus ``attention`` for the score and weighted-sum reductions of its attention layers.  An upper bound on
    the longest path when the model is one chain (parallel branches are counted too)."""
    n = attention
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            n += m.in_features
        elif isinstance(m, torch.nn.modules.conv._ConvNd):
            n += m.in_channels // m.groups * math.prod(m.kernel_size)
    return n


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, terms: int,
                 dtype: torch.dtype | None = None, scale: float | None = None, roundings: int = 0,
                 stored: torch.dtype | None = None, msg: str = "") -> None:
    """Assert |actual - expected| <= bound(...) elementwise-max; the message shows error, bound and ratio."""
    actual, expected = actual.detach(), expected.detach()
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    acc = dtype or (expected.dtype if expected.is_floating_point() else torch.float32)
    if scale is None:
        scale = float(expected.abs().max()) if expected.numel() else 0.0
    scale = scale or 1.0  # an all-zero reference: compare at unit magnitude
    tol = bound(terms, dtype=acc, scale=scale, roundings=roundings, stored=stored)
    err = float((actual.double() - expected.double()).abs().max()) if actual.numel() else 0.0
    assert math.isfinite(err) and err <= tol, (
        f"{msg} max |diff| {err:.3g} > bound {tol:.3g} ({err / tol:.2f}x; {acc}, {terms} terms, scale {scale:.3g})")


def stores_bound(*, roundings: int, scale: float, stored: torch.dtype, terms: int = 1,
                 dtype: torch.dtype = torch.float32) -> float:
    """Worst-case |a - b| for two implementations of the same computation that store intermediate
    values in ``stored`` (e.g. bf16) at ``roundings`` places where they differ (one rounds and the other
    keeps fp32, or both round values that already differ), accumulating in ``dtype``.

    Per differing store: |fl(x) - fl(y)| <= |x - y| + u|x| + u|y|, i.e. the upstream difference plus
    at most 2u = one eps of ``stored`` times the magnitude; first order, relative errors add along the
    chain (as in ``bound``), so R stores give R * eps * scale, plus the accumulation (2 gamma_terms).
    ``bound(..., roundings=R, stored=...)`` charges one eps per store to *each* of the two evaluations
    (2R eps); this is the per-store count a difference of two evaluations actually needs."""
    u = eps(dtype) / 2
    n = max(int(terms), 1)
    gamma = n * u / (1 - n * u)
    return (2 * gamma + roundings * eps(stored)) * scale / MARGIN


def grad_bound(*, terms: int, tokens: int, scale: float, forward_roundings: int, stored: torch.dtype,
               backward_roundings: int | None = None, rank_sum: int = 1, dtype: torch.dtype = torch.float32) -> float:
    """Worst-case |a - b| for one weight-gradient entry computed by two implementations that store
    activations in ``stored`` (e.g. bf16) at different points and accumulate in ``dtype``.

    A weight gradient is a sum over tokens of products, G = sum_t delta_t x_t: x_t the weight's input
    (a forward activation), delta_t the gradient arriving at its output (the backward pass, which reads
    the forward activations too).  First order, with relative errors adding along the chain as in
    ``bound``:

    * x_t carries the forward stores that differ between the implementations (``forward_roundings``,
      each at most one eps of ``stored`` apart: u in each, u = eps/2);
    * delta_t carries those again (the backward multiplies by the forward's activations, softmax and
      gate values) plus the backward's own differing stores (``backward_roundings``: the gradient of
      each differing forward store is stored in the same dtype, so by default as many);
    * the fp32 accumulation: the forward and backward chains (2 * ``terms``) and the sum over
      ``tokens``, as in ``bound`` (gamma_n);
    * the stored gradient itself: each rank rounds its part to ``stored`` before the ``rank_sum``
      ranks' parts are added, the reference rounds once: (rank_sum + 1) * u.

    Each term is relative to sum_t |delta_t| |x_t|, which ``scale`` must bound; tests pass the
    largest reference gradient of the parameter's layer (a router's own gradient can cancel to
    rounding noise, see test_hf_options._layer_of).  A loose worst case, like ``bound``.
    """
    back = forward_roundings if backward_roundings is None else backward_roundings
    u = eps(dtype) / 2
    n = max(2 * int(terms) + int(tokens), 1)
    gamma = n * u / (1 - n * u)
    storage = (2 * forward_roundings + back) * eps(stored) + (rank_sum + 1) * eps(stored) / 2
    return (2 * gamma + storage) * scale / MARGIN
