"""Kronecker factors of one linear layer and the preconditioned gradient: pure tensor functions.

For a weight used in products ``out_i = W a_i`` over N rows (every use of the weight in one
forward pass counts, each of its rows a sample: K-FAC-expand), with ``g_i`` the gradient of the
loss with respect to ``out_i``:

    A = (1/N) sum_i a_i a_i^T            G = N sum_i g_i g_i^T = (1/N) sum_i (N g_i)(N g_i)^T

``N g_i`` is the gradient per row when the loss is a mean over the N rows (the convention of
kfac-pytorch's batch-averaged factors). A bias added by the same product is the last column of
the weight, with a 1 appended to every ``a_i`` (homogeneous coordinates).

The gradient ``M`` (``[out, in]``, the bias as the last column) is preconditioned as
- ``method="inverse"``: ``(G + damping I)^-1 M (A + damping I)^-1``;
- ``method="eigen"``: with ``A = Q_A diag(d_A) Q_A^T`` and ``G = Q_G diag(d_G) Q_G^T``,
  ``Q_G [(Q_G^T M Q_A) / (d_G d_A^T + damping)] Q_A^T``, the exact solution of
  ``G X A + damping X = M``: damping of the Kronecker product itself rather than of each factor.

A factor wider than a limit is replaced by its diagonal (a 1-D tensor here): its cost is then
linear in the width (a 1433-wide bag-of-words input would otherwise cost an eigendecomposition
of 1433 x 1433 per update, far more than a full-graph epoch on such a graph). Its eigenvectors
are the identity, so both methods above apply unchanged.
"""

from __future__ import annotations

from functools import cache

import torch

__all__ = ["METHODS", "tri_size", "pack_upper", "unpack_upper", "rows_of", "covariance",
           "factor_size", "pack_factor", "unpack_factor", "decompose", "decomposition_size",
           "pack_decomposition", "unpack_decomposition", "precondition"]

METHODS = ("eigen", "inverse")


def tri_size(n: int) -> int:
    """Number of entries in the upper triangle (with the diagonal) of an n x n matrix."""
    return n * (n + 1) // 2


@cache
def _triu(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    i, j = torch.triu_indices(n, n)
    return i, j


def pack_upper(m: torch.Tensor) -> torch.Tensor:
    """The upper triangle of a symmetric matrix, row by row. Shapes: m ``[n, n]`` -> ``[n(n+1)/2]``."""
    i, j = _triu(m.shape[0])
    return m[i, j]


def unpack_upper(v: torch.Tensor, n: int) -> torch.Tensor:
    """The symmetric matrix whose upper triangle is ``v`` (inverse of :func:`pack_upper`)."""
    i, j = _triu(n)
    m = v.new_zeros((n, n))
    m[i, j] = v
    m[j, i] = v
    return m


def rows_of(t: torch.Tensor, keep: int | None, width: int) -> torch.Tensor:
    """The first ``keep`` rows of ``t`` (all when None), flattened to ``[rows, width]``.

    Shapes: t ``[n, *, width]``.
    """
    t = t if keep is None else t[:keep]
    return t.reshape(-1, width)


def covariance(x: torch.Tensor, ones: bool = False, diagonal: bool = False) -> torch.Tensor:
    """``x^T x`` (``[d, d]``), or only its diagonal (``[d]``), with a column of ones appended to
    ``x`` when ``ones``.

    Shapes: x ``[rows, d]``.
    """
    if diagonal:
        d = x.square().sum(0)
        return torch.cat([d, d.new_full((1,), x.shape[0])]) if ones else d
    if ones:
        x = torch.cat([x, x.new_ones((x.shape[0], 1))], 1)
    return x.t() @ x


def factor_size(n: int, diagonal: bool) -> int:
    """Entries :func:`pack_factor` writes for an n-wide factor."""
    return n if diagonal else tri_size(n)


def pack_factor(f: torch.Tensor) -> torch.Tensor:
    """A factor as a flat tensor: a diagonal as it is, a matrix's upper triangle."""
    return f if f.dim() == 1 else pack_upper(f)


def unpack_factor(v: torch.Tensor, n: int, diagonal: bool) -> torch.Tensor:
    return v.clone() if diagonal else unpack_upper(v, n)


def decompose(f: torch.Tensor, method: str, damping: float) -> list[torch.Tensor]:
    """What preconditioning needs of a factor: ``[Q, d]`` (eigen; eigenvalues clamped at 0,
    which only cuts rounding noise from a positive semi-definite factor) or
    ``[(f + damping I)^-1]`` (inverse); for a diagonal factor ``[d]`` or
    ``[1 / (d + damping)]``."""
    if f.dim() == 1:
        return [f.clamp_min(0)] if method == "eigen" else [1 / (f + damping)]
    if method == "eigen":
        d, q = torch.linalg.eigh(f)
        return [q, d.clamp_min(0)]
    damped = f + damping * torch.eye(f.shape[0], dtype=f.dtype, device=f.device)
    chol, info = torch.linalg.cholesky_ex(damped)
    return [torch.cholesky_inverse(chol) if int(info) == 0 else torch.linalg.inv(damped)]


def decomposition_size(n: int, method: str) -> int:
    """Entries :func:`pack_decomposition` writes for an n x n (not diagonal) factor."""
    return n * n + n if method == "eigen" else tri_size(n)


def pack_decomposition(parts: list[torch.Tensor], method: str) -> torch.Tensor:
    if method == "eigen":
        return torch.cat([parts[0].reshape(-1), parts[1]])
    return pack_upper(parts[0])


def unpack_decomposition(v: torch.Tensor, n: int, method: str) -> list[torch.Tensor]:
    if method == "eigen":
        return [v[: n * n].view(n, n), v[n * n:]]
    return [unpack_upper(v, n)]


def precondition(m: torch.Tensor, a: list[torch.Tensor], g: list[torch.Tensor], method: str,
                 damping: float) -> torch.Tensor:
    """The preconditioned gradient of ``m`` from the decompositions of A and G (module docstring).

    Shapes: m ``[out, in]``; a, g as :func:`decompose` returns them for ``[in, in]`` (or
    diagonal ``[in]``) and ``[out, out]`` (or ``[out]``) factors.
    """
    if method == "eigen":
        da, dg = a[-1], g[-1]
        v = m if len(a) == 1 else m @ a[0]
        v = v if len(g) == 1 else g[0].t() @ v
        v = v / (dg[:, None] * da[None, :] + damping)
        v = v if len(a) == 1 else v @ a[0].t()
        return v if len(g) == 1 else g[0] @ v
    ia, ig = a[0], g[0]
    v = m * ia[None, :] if ia.dim() == 1 else m @ ia
    return ig[:, None] * v if ig.dim() == 1 else ig @ v
