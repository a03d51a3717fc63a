"""Output-space metric factors L_o with M_o = L_oᵀL_o (MATH.md §2.1).

Each factor maps the output Jacobian J (shape (B, C, N): sample, output, parameter) to the metric factor
K = L_o J of shape (d, N), d = B·C, so that the Gauss–Newton / Fisher metric is μI + KᵀK.

- ``identity``: squared error L = (1/B) Σ ½‖y_b − t_b‖²; M_o = I/B, L_o = I/√B.
- ``fisher``: softmax cross-entropy; per sample M_o = (diag p − ppᵀ)/B, L_o = (diag √p − √p pᵀ)/√B (exact).
- ``ggn``: any loss; M_o = ∇²_y L (all B·C outputs at once), factored as diag(√λ₊)Vᵀ from its eigen-
  decomposition (a generalised Gauss–Newton metric; PSD losses only, negative curvature is clipped to 0).
"""

from __future__ import annotations

import torch
from torch.func import hessian

OUTPUT_METRICS = ("identity", "fisher", "ggn")
_AUTO = {"mse": "identity", "cross_entropy": "fisher"}


def resolve_output(output: str, loss_name: str) -> str:
    """The output metric ``output`` names; ``"auto"`` picks the exact one for the problem's loss."""
    if output == "auto":
        return _AUTO.get(loss_name, "ggn")
    if output not in OUTPUT_METRICS:
        raise ValueError(f"unknown output metric {output!r}; choose 'auto' or one of {list(OUTPUT_METRICS)}")
    return output


def identity_factor(jac: torch.Tensor) -> torch.Tensor:
    """K = J/√B for the squared error. Cost O(dN)."""
    b = jac.shape[0]
    return jac.reshape(-1, jac.shape[-1]) / b**0.5


def fisher_factor(jac: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """K_b = (diag √p − √p pᵀ) J_b / √B per sample, p = softmax(logits_b). Cost O(dN)."""
    b = jac.shape[0]
    p = torch.softmax(logits, dim=-1)
    sqrt_p = p.sqrt()
    mean_row = torch.einsum("bc,bcn->bn", p, jac)  # pᵀ J_b
    k = sqrt_p[..., None] * (jac - mean_row[:, None, :])
    return k.reshape(-1, jac.shape[-1]) / b**0.5


def ggn_factor(jac: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor, loss_fn) -> torch.Tensor:
    """K = diag(√λ₊) Vᵀ J with ∇²_y L = V diag(λ) Vᵀ over all d outputs. Cost O(d³ + d²N)."""
    d = outputs.numel()
    h = hessian(lambda y: loss_fn(y.reshape(outputs.shape), targets))(outputs.reshape(-1))
    h = 0.5 * (h + h.T)
    lam, vecs = torch.linalg.eigh(h)
    factor = lam.clamp_min(0).sqrt()[:, None] * vecs.T
    return factor @ jac.reshape(d, -1)
