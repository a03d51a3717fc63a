"""Linear modules y = W x + b and their structured products (MATH.md §2.2).

For inputs of shape (B, in) (one vector per sample), without materialising K:

    (K Kᵀ)_{(b,r),(b',r')} = (l_{b,r}·l_{b',r'}) (x_b·x_{b'} + 1)          cost O(d²·out + B²·in)
    Kᵀu:  ∂W = Σ u_{br} l_{br} x_bᵀ,  ∂b = Σ u_{br} l_{br}                    cost O(d·out + B·in·out)
    K g:  (K g)_{br} = l_{br} · (G_W x_b + g_b)                               cost O(B·in·out + d·out)

For inputs with extra per-sample dimensions (tokens: (B, T, in)) the weight is shared over them, K is
materialised as K_{(b,r)} = Σ_t l_{b,r,t} x_{b,t}ᵀ ⊕ Σ_t l_{b,r,t}, cost O(B·R·T·in·out).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flows.linalg import gram as gram_of


class Linear(nn.Linear):
    """y = W x + b (bias optional), parameters (W row-major, then b). Float64 by default."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, dtype=torch.float64,
                 device=None):
        super().__init__(in_features, out_features, bias=bias, dtype=dtype, device=device)


class LinearOps:
    """Structured products of an ``nn.Linear`` node (its parameters: weight, then bias)."""

    structured = True

    def __init__(self, module: nn.Linear):
        self.has_bias = module.bias is not None
        self.out_features, self.in_features = module.weight.shape
        self.local_names = ("weight", "bias") if self.has_bias else ("weight",)

    def forward(self, p, ins):
        return F.linear(ins[0], p["weight"], p.get("bias"))

    def pull(self, p, ins, rows, want):
        return [rows @ p["weight"] if want[0] else None], None

    def vjp_param(self, p, ins, lam):
        """Σ_b B_bᵀ λ_b as one flat vector: the block gradient when λ is the costate."""
        x = ins[0].reshape(-1, self.in_features)
        lam = lam.reshape(-1, self.out_features)
        return self._join(lam.T @ x, lam.sum(0) if self.has_bias else None)

    def k_rows(self, p, ins, rows):
        """K = L B materialised: (B, R, n)."""
        x = ins[0]
        b, r = rows.shape[:2]
        if x.ndim == 2:
            k_w = torch.einsum("bro,bi->broi", rows, x).reshape(b, r, -1)
            return torch.cat([k_w, rows], dim=2) if self.has_bias else k_w
        x = x.reshape(b, -1, self.in_features)
        rows = rows.reshape(b, r, -1, self.out_features)
        k_w = torch.einsum("brto,bti->broi", rows, x).reshape(b, r, -1)
        return torch.cat([k_w, rows.sum(2)], dim=2) if self.has_bias else k_w

    # -- dual path without K (inputs (B, in) only) ---------------------------------------------------
    def has_gram(self, ins) -> bool:
        return ins[0].ndim == 2

    def _split(self, flat):
        n_w = self.out_features * self.in_features
        g_w = flat[:n_w].reshape(self.out_features, self.in_features)
        return g_w, (flat[n_w:] if self.has_bias else None)

    def _join(self, g_w, g_b):
        return torch.cat([g_w.reshape(-1), g_b]) if self.has_bias else g_w.reshape(-1)

    def dual(self, ins, rows):
        """(K Kᵀ, g ↦ K g, u ↦ Kᵀu) without K."""
        return self.gram(ins, rows), lambda g: self.k_mv(ins, rows, g), lambda u: self.k_t(ins, rows, u)

    def gram(self, ins, rows):
        x = ins[0]
        b, r, _ = rows.shape
        flat = rows.reshape(b * r, -1)
        inputs = x @ x.T
        if self.has_bias:
            inputs = inputs + 1
        out = gram_of(flat)
        out.view(b, r, b, r).mul_(inputs[:, None, :, None])  # in place: no second d × d buffer
        return out

    def k_mv(self, ins, rows, g):
        g_w, g_b = self._split(g)
        z = ins[0] @ g_w.T
        if self.has_bias:
            z = z + g_b
        return torch.einsum("bro,bo->br", rows, z).reshape(-1)

    def k_t(self, ins, rows, u):
        b, r = rows.shape[:2]
        lu = torch.bmm(u.reshape(b, 1, r), rows).reshape(b, -1)  # Σ_r u_br l_br
        return self._join(lu.T @ ins[0], lu.sum(0) if self.has_bias else None)
