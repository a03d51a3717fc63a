"""Output-space metric factors L_o with M_o = L_oᵀL_o (MATH.md §2.1), one block per sample.

A factor is returned as ``rows`` of shape (B, R, C): sample b owns R rows of length C (its outputs), so
row (b, r) touches only sample b. With per-sample output Jacobians J_b (C × N), the metric factor is
K = L_o J, row (b, r) = rows[b, r] · J_b, and the Gauss–Newton / Fisher metric is μI + KᵀK. The number of
factor rows is d = B·R.

- ``identity``: squared error L = (1/B) Σ ½‖y_b − t_b‖²; M_o = I/B, rows = I/√B (R = C).
- ``fisher``: softmax cross-entropy; M_o,b = (diag p − ppᵀ)/B, rows = (diag √p − √p pᵀ)/√B (exact, R = C).
- ``ggn``: any loss that is a sum over samples; M_o,b = ∇²_{y_b} L, factored as diag(√λ₊)Vᵀ from its eigen-
  decomposition (robust where the block is only semi-definite, as the softmax Fisher is; R = C).
- ``sampled_fisher``: r probes k ~ p per sample, rows (e_k − p)/√(rB): an unbiased estimate of the Fisher with
  R = r rows. The probes are drawn by inverse CDF from uniforms fixed by ``seed``, so the metric is a
  deterministic but *non-smooth* function of θ: use it for discrete-time updates, not inside adaptive ODE solves.
"""

from __future__ import annotations

import torch
from torch.func import hessian

from flows.linalg import softmax

OUTPUT_METRICS = ("identity", "fisher", "ggn", "sampled_fisher")
AMPLIFICATION_LIMIT = 1e3
_AUTO = {"mse": "identity", "cross_entropy": "fisher"}


def resolve_output(output: str, loss_name: str) -> str:
    """The output metric ``output`` names; ``"auto"`` picks the exact one for the problem's loss."""
    if output == "auto":
        return _AUTO.get(loss_name, "ggn")
    if output not in OUTPUT_METRICS:
        raise ValueError(f"unknown output metric {output!r}; choose 'auto' or one of {list(OUTPUT_METRICS)}")
    return output


def identity_rows(outputs: torch.Tensor) -> torch.Tensor:
    """rows_b = I_C/√B. Cost O(BC²)."""
    b, c = outputs.shape
    eye = torch.eye(c, dtype=outputs.dtype, device=outputs.device) / b**0.5
    return eye.expand(b, c, c)


def fisher_rows(logits: torch.Tensor) -> torch.Tensor:
    """rows_b = (diag √p − √p pᵀ)/√B with p = softmax(logits_b); rows_bᵀ rows_b = (diag p − ppᵀ)/B."""
    b = logits.shape[0]
    p = softmax(logits)
    sqrt_p = p.sqrt()
    return (torch.diag_embed(sqrt_p) - sqrt_p[:, :, None] * p[:, None, :]) / b**0.5


def reduced_fisher_rows(logits: torch.Tensor, lam: torch.Tensor | None = None):
    """The softmax Fisher factor with its null row reflected away: C − 1 rows per sample, exactly
    rowsᵀrows = (diag p − ppᵀ)/B, so the d × d inner solves of a dual metric have d = B(C − 1).

    L_b = (diag s − s pᵀ)/√B (s = √p) has sᵀL_b = 0. The Householder reflection H_b = I − 2vvᵀ/|v|² with
    v = s + e_0 (|v|² = 2 + 2s_0 ≥ 2, never ill-conditioned) is orthogonal and maps s to −e_0, so
    (H_bL_b)ᵀH_bL_b = L_bᵀL_b and the first row of H_bL_b is −sᵀL_b = 0: drop it. As vᵀL_b = L_b[0], H_bL_b =
    L_b − α v L_b[0] with α = 2/|v|² = 1/(1 + s_0), and since 1 − α s_0 = α its rows j = 1 … C − 1 are

        rows_j = s_j (e_j − α(p + s_0 e_0)) / √B.

    Given the output gradient ``lam``, also its coefficients in these rows: those of L_b, c_b = √B λ_b/s
    (:func:`gradient_coefficients`), map as H_bc_b without its first entry, (H_bc)_j = c_j − α s_j (s·c + c_0);
    then (rows, c) is returned. Cost O(B·C²)."""
    b, c = logits.shape
    p = softmax(logits)
    s = p.sqrt()
    alpha = 1 / (1 + s[:, :1])  # (B, 1)
    e = torch.eye(c, dtype=p.dtype, device=p.device)
    shifted = p + s[:, :1] * e[0]  # p + s_0 e_0
    rows = (s[:, 1:, None] / b**0.5) * (e[1:] - alpha[:, :, None] * shifted[:, None, :])
    if lam is None:
        return rows
    coefficients = lam.reshape(b, c) * b**0.5 / s
    dot = (s * coefficients).sum(1, keepdim=True) + coefficients[:, :1]
    return rows, coefficients[:, 1:] - alpha * s[:, 1:] * dot


def _output_hessian(outputs, targets, loss_fn):
    b, c = outputs.shape[0], outputs[0].numel()
    h = hessian(lambda y: loss_fn(y.reshape(outputs.shape), targets))(outputs.reshape(-1)).reshape(b, c, b, c)
    idx = torch.arange(b, device=outputs.device)
    return h, h[idx, :, idx, :]  # the full Hessian and its per-sample blocks (B, C, C)


def check_separable(outputs: torch.Tensor, targets: torch.Tensor, loss_fn) -> None:
    """Raise ValueError if the loss couples samples (its output Hessian is not block-diagonal over samples)."""
    h, blocks = _output_hessian(outputs.detach(), targets, loss_fn)
    off = float(h.abs().sum() - blocks.abs().sum())
    if off > 1e-10 * max(float(blocks.abs().sum()), 1e-300):
        raise ValueError(f"the loss couples samples (off-diagonal output-Hessian mass {off:.3g}); the ggn output "
                         "metric needs a loss that is a sum over samples")


def ggn_rows(outputs: torch.Tensor, targets: torch.Tensor, loss_fn) -> torch.Tensor:
    """Per-sample factors of ∇²_y L (see :func:`check_separable`). Cost O((BC)²) for the Hessian plus O(BC³)
    for the eigen-solves."""
    _, blocks = _output_hessian(outputs, targets, loss_fn)
    blocks = 0.5 * (blocks + blocks.transpose(1, 2))
    lam, vecs = torch.linalg.eigh(blocks)
    return lam.clamp_min(0).sqrt()[:, :, None] * vecs.transpose(1, 2)


def sampled_fisher_rows(logits: torch.Tensor, probes: int, seed: int = 0) -> torch.Tensor:
    """rows (e_k − p)/√(rB) for r probes k ~ softmax(logits_b) per sample (non-smooth in θ; see module doc)."""
    b, c = logits.shape
    p = softmax(logits)
    u = torch.rand(b, probes, generator=torch.Generator().manual_seed(seed), dtype=p.dtype).to(p.device)
    k = torch.searchsorted(p.cumsum(-1).detach(), u).clamp_max(c - 1)
    onehot = torch.nn.functional.one_hot(k, c).to(p.dtype)
    return (onehot - p[:, None, :]) / (probes * b) ** 0.5


def output_rows(kind: str, outputs: torch.Tensor, targets: torch.Tensor, loss_fn, *, probes: int = 1,
                seed: int = 0) -> torch.Tensor:
    """The factor rows (B, R, C) of the output metric ``kind`` at network outputs (B, C)."""
    flat = outputs.reshape(outputs.shape[0], -1)
    if kind == "identity":
        return identity_rows(flat)
    if kind == "fisher":
        return fisher_rows(flat)
    if kind == "ggn":
        return ggn_rows(outputs, targets, loss_fn)
    if kind == "sampled_fisher":
        return sampled_fisher_rows(flat, probes, seed)
    raise ValueError(f"unknown output metric {kind!r}; choose one of {list(OUTPUT_METRICS)}")


def gradient_coefficients(kind: str, outputs: torch.Tensor, lam: torch.Tensor) -> torch.Tensor | None:
    """Coefficients c (B, R) of the factor rows of ``output_rows(kind, outputs, …)`` with rows_bᵀc_b = λ_b, in closed
    form, where the output gradient λ (B, C) lies in the rows' span; None for the other output metrics.

        identity:  rows_b = I/√B                          c_b = √B λ_b
        fisher:    rows_b = (diag √p − √p pᵀ)/√B          c_b = √B λ_b / √p_b

    For the Fisher, rows_bᵀc_b = (√p ⊙ c_b − p (√p·c_b))/√B = λ_b − p Σ_k λ_bk, which is λ_b whenever λ_b sums to
    zero — as the cross-entropy gradient (p − t)/B does for every target distribution t. Then ∇L = J_aᵀλ = K_aᵀc for
    every block at once (K_a = rows · J_a), so G_a⁻¹∇_aL = (μI + K_aᵀK_a)⁻¹K_aᵀc = K_aᵀ(μI + K_aK_aᵀ)⁻¹c needs neither
    the gradient nor K_a g. Whether c is exact and accurate is for :func:`coefficients_reproduce` to say. Cost O(BC)."""
    flat = outputs.reshape(outputs.shape[0], -1)
    lam = lam.reshape(flat.shape)
    if kind == "identity":
        return lam * flat.shape[0] ** 0.5
    if kind == "fisher":
        return lam * flat.shape[0] ** 0.5 / softmax(flat).sqrt()
    return None


def coefficients_reproduce(rows: torch.Tensor, c: torch.Tensor, lam: torch.Tensor,
                           limit: float = AMPLIFICATION_LIMIT) -> torch.Tensor:
    """Whether Σ_r c_br rows_br reproduces λ_b to working precision, without cancellation that loses more than a
    factor ``limit`` of it: max |rowsᵀc − λ| ≤ limit·ε·max |λ| and max_b,k Σ_r |c_br rows_brk| ≤ limit·max |λ|.
    A gradient outside the rows' span (a sampled Fisher, a loss whose gradient does not sum to zero) fails the
    first test; a vanishing probability p_b of the true class (c ∝ 1/√p) fails the second. A boolean tensor (no
    host synchronisation, so it works under ``torch.func.vmap``). Cost O(B·R·C)."""
    terms = c[:, :, None] * rows.reshape(*rows.shape[:2], -1)  # c_br rows_brk
    scale = lam.abs().amax()
    error = (terms.sum(1) - lam.reshape(lam.shape[0], -1)).abs().amax()
    summed = terms.abs().sum(1).amax()
    # NaN or ∞ in c makes both comparisons False
    return (error <= limit * torch.finfo(rows.dtype).eps * scale) & (summed <= limit * scale)
