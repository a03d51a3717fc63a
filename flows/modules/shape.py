"""Data-movement glue: reshapes and permutations of each sample's entries (``flatten``, ``view``, ``reshape``,
``unflatten``, ``transpose``, ``permute``, ``contiguous``; ``nn.Flatten``, ``nn.Unflatten``).

Such a node maps every sample by a fixed permutation of its entries, y_b = x_b[π] (π the identity for a reshape,
which keeps the row-major order), so its Jacobian is a permutation matrix and the rows pull back by the inverse
permutation, no derivative taken:

    rows · ∂y/∂x = rows[…, π⁻¹]        (a reshape: rows reshaped to the input's sample shape)

π is read once per input shape by applying the node to the entry indices 0 … n−1 of one sample; a node that is not
a permutation of them keeps the generic per-sample vjp path. Cost O(B·R·n) for a gather (nothing for a reshape),
against R batched vjps for the generic path — 0.59 ms per sweep for the ``nn.Flatten`` of the benchmark CNN
(benchmarks/metrics.py, batch 32, 10 rows per sample).
"""

from __future__ import annotations

import torch
from torch import fx, nn

from flows.modules.generic import GenericOps

METHODS = frozenset({"flatten", "view", "reshape", "unflatten", "transpose", "permute", "contiguous"})
FUNCTIONS = frozenset({torch.flatten, torch.reshape, torch.unflatten, torch.transpose, torch.permute})
MODULES = (nn.Flatten, nn.Unflatten)


def supports(fx_node: fx.Node, model: nn.Module) -> bool:
    """Whether the torch.fx node is one of the data-movement operations above."""
    if fx_node.op == "call_method":
        return fx_node.target in METHODS
    if fx_node.op == "call_function":
        return fx_node.target in FUNCTIONS
    if fx_node.op == "call_module":
        return isinstance(model.get_submodule(fx_node.target), MODULES)
    return False


class ShapeOps:
    """Rows through a per-sample permutation of entries (module docstring); ``fallback`` (the node's
    :class:`GenericOps`) where the node turns out not to be one."""

    structured = True
    local_names: tuple[str, ...] = ()

    def __init__(self, fn, fallback: GenericOps):
        self.fn = fn
        self.fallback = fallback
        self._inverse: dict = {}  # (sample shape, device) → None (reshape), inverse permutation, or False (not one)

    def forward(self, p, ins):
        return self.fn(p, ins)

    def inverse_permutation(self, sample_shape: torch.Size, device) -> torch.Tensor | None | bool:
        """π⁻¹ for inputs of this per-sample shape: None for a reshape (π = identity), False when the node is not a
        permutation of the entries."""
        key = (tuple(sample_shape), str(device))
        if key not in self._inverse:
            n = sample_shape.numel()
            order = torch.arange(n, device=device)
            try:
                out = self.fn({}, [order.reshape(1, *sample_shape)])
            except Exception:  # noqa: BLE001 - an op that does not take integer entries: the generic path decides
                out = None
            if not isinstance(out, torch.Tensor) or out.ndim == 0 or out.shape[0] != 1 or out.numel() != n:
                self._inverse[key] = False
            else:
                pi = out.reshape(-1)
                if torch.equal(pi, order):
                    self._inverse[key] = None
                elif torch.equal(pi.sort().values, order):
                    self._inverse[key] = torch.argsort(pi)
                else:
                    self._inverse[key] = False
        return self._inverse[key]

    def pull(self, p, ins, rows, want):
        if not want[0]:
            return [None], None
        x = ins[0]
        inverse = self.inverse_permutation(x.shape[1:], x.device)
        if inverse is False:
            return self.fallback.pull(p, ins, rows, want)
        b, r = rows.shape[:2]
        flat = rows.reshape(b, r, -1)
        if inverse is not None:
            flat = flat[:, :, inverse]
        return [flat.reshape(b, r, *x.shape[1:])], None
