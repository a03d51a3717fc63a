"""Embeddings y_{b,t} = W[i_{b,t}] (token indices i, not differentiated).

Row (b, r) of the factor at the output, l_{b,r} of shape (T, E), gives K_{(b,r)} = Σ_t e_{i_{b,t}} ⊗ l_{b,r,t}: the
rows scattered into the vocabulary (V × E, materialised by one scatter-add, cost O(B·R·(V + T)·E)).
Structured only without ``padding_idx`` and ``max_norm`` (which change the Jacobian); else the generic path.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


def supports(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding) and module.padding_idx is None and module.max_norm is None


class EmbeddingOps:
    """Structured products of an ``nn.Embedding`` node."""

    structured = True
    local_names = ("weight",)

    def __init__(self, module: nn.Embedding):
        self.num, self.dim = module.num_embeddings, module.embedding_dim

    def forward(self, p, ins):
        return F.embedding(ins[0], p["weight"])

    def pull(self, p, ins, rows, want):
        return [None], None  # integer indices carry no rows

    def k_rows(self, p, ins, rows):
        b, r = rows.shape[:2]
        idx = ins[0].reshape(b, 1, -1, 1).expand(b, r, -1, self.dim)
        k = rows.new_zeros(b, r, self.num, self.dim)
        return k.scatter_add_(2, idx, rows.reshape(b, r, -1, self.dim)).reshape(b, r, -1)

    def vjp_param(self, p, ins, lam):
        return self.k_rows(p, ins, lam[:, None]).sum((0, 1))
