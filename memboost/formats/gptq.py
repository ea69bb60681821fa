"""GPTQ's error feedback, shared by the formats that round with it (mixed's
2/4-bit groups, LoRT's ternary levels): the input second moment H = X^T X /
rows conditioned as GPTQ does, the upper Cholesky factor of its inverse, and
the column sweep that rounds one column at a time and spreads its error over
the columns not yet rounded."""

from typing import Callable

import torch

from ..errors import MemboostError


def conditioned_hessian(hessian: torch.Tensor, damp: float, shrink: float = 0.0) -> torch.Tensor:
    """H in float64, shrunk toward its diagonal by `shrink` ((1 - shrink) * H
    + shrink * diag(H)), inputs that never fired given a unit diagonal, then
    damped: + damp * mean(diag H) on the diagonal. Positive definite for any
    positive semi-definite H."""
    h = hessian.to(torch.float64).clone()
    diag = h.diagonal()
    if shrink:
        kept = diag.clone()
        h.mul_(1.0 - shrink)
        diag.copy_(kept)
    dead = diag <= 0  # an input that never fired: its column is free
    diag[dead] = 1.0
    diag += damp * float(diag.mean())
    return h


def hessian_factor(hessian: torch.Tensor, damp: float, shrink: float = 0.0) -> torch.Tensor:
    """The upper Cholesky factor U of H^-1 (H conditioned as
    conditioned_hessian does), as GPTQ uses it: quantizing column j with
    error e moves the later columns by -e / U[j, j] * U[j, j+1:], which
    minimises the output error on the calibration inputs given the columns
    already fixed."""
    return inverse_factor(conditioned_hessian(hessian, damp, shrink), damp)


def inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of h^-1 (h already conditioned), float32."""
    try:
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
        return torch.linalg.cholesky(inverse, upper=True).to(torch.float32)
    except RuntimeError:  # torch.linalg.LinAlgError: not positive definite even damped
        raise MemboostError(f"'hessian' is not positive definite with damp={damp}; raise 'damp'") from None


def sweep(w: torch.Tensor, u: torch.Tensor, round_column: Callable[[int, torch.Tensor], torch.Tensor],
          block: int = 128) -> torch.Tensor:
    """GPTQ's column sweep over w [n, k] float32, updated in place and returned.

    Columns are rounded in order: round_column(j, w) returns column j as
    stored (it may read the columns after j as updated so far, e.g. to fit a
    group's scale at the group's first column; an entry stored exactly has
    no error). Its error (w[:, j] - stored) / U[j, j] is spread over the
    columns after it: within a block of `block` columns at once, to later
    blocks in one GEMM (GPTQ's lazy batch updates)."""
    n, k = w.shape
    for b0 in range(0, k, block):
        b1 = min(k, b0 + block)
        err = torch.empty(n, b1 - b0, device=w.device)
        for j in range(b0, b1):
            e = (w[:, j] - round_column(j, w)) / u[j, j]
            if j + 1 < b1:
                w[:, j + 1:b1] -= e.unsqueeze(1) * u[j, j + 1:b1].unsqueeze(0)
            err[:, j - b0] = e
        if b1 < k:
            w[:, b1:] -= err @ u[b0:b1, b1:]
    return w
