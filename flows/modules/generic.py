"""The generic leaf operator: Jacobian products of any node by per-sample vector–Jacobian products (torch.func).

A node computes y = f(w, x_1, …, x_k) from its parameters w (possibly none) and its tensor inputs. For a factor-row
block ``rows`` of shape (B, R, *y_b.shape) — row (b, r) touches only sample b — one pass returns

    rows_i = rows · ∂f/∂x_i     (B, R, *x_i,b.shape)  for every input that needs rows
    K      = rows · ∂f/∂w       (B, R, n)             materialised, when the node owns parameters

by B·R single-sample vjps (vmap over samples, vmap over rows); a parameter-free node whose inputs all carry the
batch takes R vjps of the batched map instead (valid because nodes map samples independently). Inputs that do not
carry the batch dimension (a parameter used directly, a constant) are shared by all samples; their rows are still
per sample. Integer inputs (token indices) are not differentiated. Cost: B·R vjps of one sample; memory O(B·R·n) for K.
This path serves every node for which no structured operator exists, including ``nn.MultiheadAttention``.
"""

from __future__ import annotations

import torch
from torch.func import vjp, vmap
from torch.utils._pytree import tree_leaves, tree_map


class GenericOps:
    """Per-sample vjp products of ``fn(p, ins)``; ``in_batched[i]`` says whether input i carries the batch."""

    structured = False

    def __init__(self, fn, in_batched: list[bool], out_batched: bool, local_names: tuple[str, ...] = ()):
        self.fn = fn
        self.in_batched = list(in_batched)
        self.out_batched = out_batched
        self.local_names = tuple(local_names)

    def forward(self, p, ins):
        return self.fn(p, ins)

    def pull(self, p, ins, rows, want):
        """(rows at each wanted input (None elsewhere), K (B, R, n) or None when the node has no parameters)."""
        diff = [i for i, (x, w) in enumerate(zip(ins, want)) if w and x.is_floating_point()]
        with_params = bool(self.local_names)
        if not diff and not with_params:
            return [None] * len(ins), None
        batched, out_batched, fn, names = self.in_batched, self.out_batched, self.fn, self.local_names
        if not with_params and out_batched and all(batched[i] for i in diff):
            return self._pull_batched(ins, rows, diff), None

        def one(rows_b, p, *ins_b):
            def f(pp, *xs):
                full = list(ins_b)
                for i, x in zip(diff, xs):
                    full[i] = x
                full = [x[None] if bt else x for x, bt in zip(full, batched)]
                out = fn(pp, full)
                if isinstance(out, tuple | list):  # tuple outputs (attention): their tensors, Nones dropped
                    out = tuple(o for o in out if isinstance(o, torch.Tensor))
                return tree_map(lambda t: t[0], out) if out_batched else out

            _, pullback = vjp(f, p, *[ins_b[i] for i in diff])
            grads = vmap(pullback)(rows_b)
            if not with_params:
                return tuple(grads[1:])
            r = tree_leaves(rows_b)[0].shape[0]
            return torch.cat([grads[0][n].reshape(r, -1) for n in names], dim=1), tuple(grads[1:])

        in_dims = (0, None, *[0 if bt else None for bt in batched])
        result = vmap(one, in_dims=in_dims)(rows, p if with_params else {}, *ins)
        k, pulled = result if with_params else (None, result)
        out = [None] * len(ins)
        for i, g in zip(diff, pulled):
            out[i] = g
        return out, k

    def _pull_batched(self, ins, rows, diff):
        """Rows through a parameter-free node whose inputs all carry the batch: since the node maps samples
        independently (checked when the graph is read for a metric), one vjp of the batched map per row r gives
        every sample's product at once — R batched vjps instead of B·R single-sample ones."""
        def f(*xs):
            full = list(ins)
            for i, x in zip(diff, xs):
                full[i] = x
            out = self.fn({}, full)
            if isinstance(out, tuple | list):
                out = tuple(o for o in out if isinstance(o, torch.Tensor))
            return out

        _, pullback = vjp(f, *[ins[i] for i in diff])
        pulled = vmap(pullback, in_dims=1, out_dims=1)(rows)
        out = [None] * len(ins)
        for i, g in zip(diff, pulled):
            out[i] = g
        return out
