"""LayerNorm and GroupNorm with affine parameters: y = x̂ ⊙ γ + β, x̂ the normalised input (no parameters in it).

With factor rows l_{b,r} at the output (shape of y_b), the parameter Jacobian is diagonal in the normalised
coordinates and shared over the other ones, so without any per-sample vjp

    K_γ,(b,r) = Σ_{other coords} l_{b,r} ⊙ x̂_b,      K_β,(b,r) = Σ_{other coords} l_{b,r}

(LayerNorm: "other" are the leading per-sample dims, e.g. tokens; GroupNorm: the spatial dims, per channel).
Rows through the input use R vjps of the batched map (the map is per sample). Cost O(B·R·|y_b|).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vjp, vmap

from flows.linalg import layer_norm


def supports(module: nn.Module) -> bool:
    if isinstance(module, nn.LayerNorm):
        return module.elementwise_affine
    return isinstance(module, nn.GroupNorm) and module.affine


class NormOps:
    """Structured products of an affine ``nn.LayerNorm`` / ``nn.GroupNorm`` node."""

    structured = True

    def __init__(self, module: nn.LayerNorm | nn.GroupNorm):
        self.module = module
        self.layer = isinstance(module, nn.LayerNorm)
        self.has_bias = module.bias is not None
        self.local_names = ("weight", "bias") if self.has_bias else ("weight",)

    def forward(self, p, ins):
        m = self.module
        if self.layer:
            return layer_norm(ins[0], m.normalized_shape, p["weight"], p.get("bias"), m.eps)  # composite: see it
        return F.group_norm(ins[0], m.num_groups, p["weight"], p.get("bias"), m.eps)

    def _normalised(self, x):
        m = self.module
        if self.layer:
            return layer_norm(x, m.normalized_shape, eps=m.eps)
        return F.group_norm(x, m.num_groups, eps=m.eps)

    def pull(self, p, ins, rows, want):
        if not want[0]:
            return [None], None
        _, pullback = vjp(lambda x: self.forward(p, [x]), ins[0])
        return [vmap(pullback, in_dims=1, out_dims=1)(rows)[0]], None

    def _reduce(self, t, b, r):
        """Sum over the coordinates the parameters are shared across: (B, R, *y_b) → (B, R, n_γ)."""
        if self.layer:
            n = self.module.weight.numel()
            return t.reshape(b, r, -1, n).sum(2)
        return t.reshape(b, r, t.shape[2], -1).sum(3)

    def k_rows(self, p, ins, rows):
        b, r = rows.shape[:2]
        k_g = self._reduce(rows * self._normalised(ins[0])[:, None], b, r)
        return torch.cat([k_g, self._reduce(rows, b, r)], dim=2) if self.has_bias else k_g

    def vjp_param(self, p, ins, lam):
        return self.k_rows(p, ins, lam[:, None]).sum((0, 1))
