"""K-FAC (Martens & Grosse 2015) and its convolutional form KFC (Grosse & Martens 2016) as a metric: the peer
baseline for the layerwise metric, on any module graph.

The factor rows l_{b,r} of the output metric (M_o = Σ_r l lᵀ per sample, the rows :class:`Layerwise` sweeps; they
carry the 1/√B of the loss; with the default softmax Fisher they are its C − 1 exact rows per sample, and
``output="sampled_fisher"`` gives Martens & Grosse's Monte-Carlo Fisher, ``probes`` sampled rows) are swept backward
over the model's graph (:func:`flows.modules.backward`), summed over consumers, so a Linear or convolution layer
inside a residual, branching or attention model sees exactly L_o ∂y/∂z at its output z. Write the layer as
z_{b,p} = W̄ ā_{b,p} with W̄ = [W | b] (C_out × m, the bias a column, ā = (a, 1)) applied at the positions p ∈ T of
a sample: one position for a Linear layer on (B, in), the tokens of a Linear layer on (B, T, in) (a transformer),
the |T| output positions of a convolution (ā_{b,p} the unfolded input patch, ``ConvOps.patches``; W reshaped to
(C_out, C_in·k)). Row (b, r) of the exact factor is K_{(b,r)} = vec(Σ_p l_{b,r,p} ā_{b,p}ᵀ) and the exact block
Σ_{b,r} K_{(b,r)}ᵀK_{(b,r)}; with KFC's approximations (independent activations and derivatives, spatial
homogeneity, spatially uncorrelated derivatives) it becomes

    G_a ≈ Γ ⊗ Ω,    Ω = (1/B) Σ_b Σ_{p∈T} ā_{b,p} ā_{b,p}ᵀ,    Γ = (1/|T|) Σ_{b,r} Σ_{p∈T} l_{b,r,p} l_{b,r,p}ᵀ

(Γ ⊗ Ω for θ's row-major vec(W̄); Grosse & Martens write Ω ⊗ Γ for the column-major vec)

— Grosse & Martens' convention: the input factor Ω sums over positions, the output factor Γ averages over them
(with |T| = 1 this is K-FAC for Linear; for tokens it is the "expand" form of Eschenhagen et al. 2023). In terms
of unnormalised output rows s = √B l: Γ = (1/(B|T|)) Σ_{b,r,p} s sᵀ. The block is damped by factored Tikhonov
damping (Martens & Grosse 2015, §6.3), as K-FAC for Linear always was here:

    G_a = (Γ + γ_S I) ⊗ (Ω + γ_A I),    γ_A = π √γ,  γ_S = √γ / π,  π = √((tr Ω / dim Ω) / (tr Γ / dim Γ))

(moving the |T| between the factors leaves G_a unchanged: π moves with it), inverted through the two small factors:
G_a⁻¹ vec(V) = vec((Γ + γ_S I)⁻¹ V (Ω + γ_A I)⁻¹), two Choleskys of C_out³ and m³ per block and θ call (Ω's by
Woodbury through its B·|T| rows when those are fewer than m); building the factors costs O(B·R·|T|·C_out² +
B·|T|·m²) from unfold + one GEMM each. The sweep that delivers the rows costs about R backward passes.

Every other block — a module without a Kronecker form (LayerNorm, Embedding, attention, a parameter read
directly), a module called more than once, a block spanning modules — is the exact damped block γI + K_aᵀK_a of
:class:`Layerwise` with μ = γ (K_a = L_o ∂y/∂w_a collected over the graph; primal solve when n_a < d, Woodbury
otherwise), or, with ``fallback="error"``, refused by name. ``describe()["forms"]`` says which form each block uses:
"kfac" (Linear), "kfc" (convolution) or "exact".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flows.linalg import spd_solve
from flows.metrics._base import Metric, _check_length, _positive_float, batched, block_diagonal_matrix
from flows.metrics.layerwise import Layerwise, ensemble_directions
from flows.modules import ConvOps, LinearOps, backward

FORMS = ("kfac", "kfc", "exact")
FALLBACKS = ("exact", "error")


@dataclass
class KroneckerFactors:
    """The Kronecker factors of one block (module docstring): ``s`` = Γ (C_out × C_out) and ``s_damped`` = Γ + γ_S I;
    Ω (m × m, bias last) as ``a`` and ``a_damped`` = Ω + γ_A I; the damping split ``pi`` (γ_A = π√γ in
    ``gamma_a``), the number of positions |T| (``positions``), whether the layer has a ``bias`` (Ω's last row and
    column) and the ``form`` ("kfac" or "kfc"). When the B·|T| (sample, position) rows are fewer than m, Ω is kept
    as its rows ``a_rows`` = Z (Ω = ZᵀZ, formed only on request) and solved by Woodbury,
    (Ω + γ_A I)⁻¹ = (I − Zᵀ(γ_A I + ZZᵀ)⁻¹Z)/γ_A, O(B|T|·m·C_out + (B|T|)³) instead of O(m³)."""

    s: torch.Tensor
    s_damped: torch.Tensor
    pi: torch.Tensor
    gamma_a: torch.Tensor
    positions: int
    bias: bool
    form: str
    a_matrix: torch.Tensor | None = None
    a_rows: torch.Tensor | None = None

    @property
    def a(self) -> torch.Tensor:
        return self.a_matrix if self.a_matrix is not None else self.a_rows.T @ self.a_rows

    @property
    def a_damped(self) -> torch.Tensor:
        a = self.a
        return a + self.gamma_a * _eye(a.shape[0], a)

    @property
    def inputs(self) -> int:
        """m: the width of Ω (C_in·k or in_features, plus one for the bias)."""
        return (self.a_matrix if self.a_matrix is not None else self.a_rows).shape[-1]


def _eye(n, like):
    return torch.eye(n, dtype=like.dtype, device=like.device)


def _combine_rows(c: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Σ_r c_br rows[b, r] for c (B, R) and rows (B, R, C, *spatial), by one batched product over the rows' memory
    order (channels first, or innermost as :func:`flows.modules.conv.pull_rows` leaves them): 31 against 158 µs
    for a broadcast product and sum at the benchmark CNN's first convolution."""
    b, r = c.shape
    for layout, back in ((rows, None), (rows.movedim(2, -1), 1)):
        if layout.is_contiguous():
            out = torch.bmm(c.reshape(b, 1, r), layout.reshape(b, r, -1)).reshape(layout.shape[:1] + layout.shape[2:])
            return out if back is None else out.movedim(-1, back)
    return (c.reshape(b, r, *(1,) * (rows.dim() - 2)) * rows).sum(1)


class KFAC(Metric):
    """Kronecker-factored blocks (K-FAC for Linear, KFC for Conv1d/Conv2d) on any module graph; the exact damped
    block for every other block (or a ValueError naming it, with ``fallback="error"``). See the module docstring.

    Args:
        problem: a :class:`flows.Problem`.
        damping: γ > 0 (split between the factors by π; the exact blocks get γI).
        output, metric_batch, seed, probes: the output metric and metric batch, as for :class:`Layerwise`.
        fallback: ``"exact"`` (default) or ``"error"`` for blocks without a Kronecker form.
    """

    def __init__(self, problem, damping: float = 1e-3, output: str = "auto", metric_batch=None, *, seed: int = 0,
                 probes: int = 1, fallback: str = "exact"):
        if fallback not in FALLBACKS:
            raise ValueError(f"unknown fallback {fallback!r}; choose one of {list(FALLBACKS)}")
        self.problem = problem
        self.damping = _positive_float(damping, "damping")
        self.fallback = fallback
        self._layerwise = Layerwise(problem, mu=self.damping, output=output, metric_batch=metric_batch, seed=seed,
                                    probes=probes)
        self.output = self._layerwise.output
        self.graph = self._layerwise.graph
        self._plan()

    def _plan(self):
        """Which blocks take a Kronecker form (exactly one Linear or structured convolution node, called once) and,
        for the others, which node columns feed which block columns."""
        graph = self.graph
        calls: dict = {}
        for node in graph.module_nodes:
            for n in node.param_names:
                calls[n] = calls.get(n, 0) + 1
        spans, owner = {}, {}
        for i, block in enumerate(self.problem.blocks):
            start = block.start
            for n, shape in zip(block.param_names, block.shapes):
                spans[n] = (start - block.start, start - block.start + shape.numel())
                owner[n] = i
                start += shape.numel()
        self.blocks = [(b.name, b.slice) for b in self.problem.blocks]
        self.forms: dict[str, str] = {}
        self._kron: dict = {}  # node name → block index
        for i, block in enumerate(self.problem.blocks):
            names = tuple(block.param_names)
            nodes = [v for v in graph.module_nodes if v.kind == "module" and v.param_names == names]
            node = nodes[0] if len(nodes) == 1 and all(calls.get(n, 0) == 1 for n in names) else None
            if node is not None and isinstance(node.ops, LinearOps | ConvOps):
                self._kron[node.name] = i
                self.forms[block.name] = "kfac" if isinstance(node.ops, LinearOps) else "kfc"
                continue
            if self.fallback == "error":
                raise ValueError(f"K-FAC has no Kronecker form for block {block.name!r}: " + self._why(block, nodes,
                                                                                                         calls))
            self.forms[block.name] = "exact"
        self._collect: dict = {}  # node name → [(block index, node columns, block columns)]
        for node in graph.module_nodes:
            if node.name in self._kron:
                continue
            pieces, col = [], 0
            for n in node.param_names:
                lo, hi = spans[n]
                pieces.append((owner[n], slice(col, col + hi - lo), slice(lo, hi)))
                col += hi - lo
            self._collect[node.name] = pieces

    def _why(self, block, nodes, calls) -> str:
        if not nodes:
            return "its parameters are not exactly one module's (a block spanning modules or a parameter read " \
                   "directly)"
        if len(nodes) > 1 or any(calls.get(n, 0) > 1 for n in block.param_names):
            return "its module is called more than once"
        module = self.graph.model.get_submodule(nodes[0].module)
        return f"module {nodes[0].module!r} is a {type(module).__name__}; only Linear and Conv1d/Conv2d (zero " \
               "padding given as sizes, one group) have one; use fallback='exact' for its exact damped block"

    # -- the factors --------------------------------------------------------------------------------------
    def _kronecker(self, node, ins, at, r, costate=False, coefficients=None):
        """Ω and Γ of one Linear / convolution node from its input and the factor rows ``at[:, :r]`` at its output;
        with ``costate`` also the block gradient Σ_{b,p} λ_{b,p} ā_{b,p}ᵀ (as W̄, C_out × m) from the same patches, where
        λ is the row ``at[:, r]`` or, given the ``coefficients`` c of the output gradient in the factor rows
        (:meth:`Layerwise.output_factor`), λ_b = Σ_r c_br l_br recombined from the rows here."""
        b = at.shape[0]
        rows = at[:, :r]
        lam = None
        if costate:
            lam = at[:, r] if coefficients is None else _combine_rows(coefficients.reshape(b, r), at)
        bias = len(node.param_names) == 2
        s = None
        if isinstance(node.ops, ConvOps):
            u = node.ops.patches(ins[0])  # (B, C_in·k, |T|)
            out, positions = node.ops.out_channels, u.shape[-1]
            # one GEMM each over all (sample, position) pairs: a copy to (B|T|, m) beats einsum's own path; the
            # patches are copied straight into the buffer that holds the bias column too
            x = u.new_empty(b * positions, u.shape[1] + bias)
            x[:, :u.shape[1]].view(b, positions, -1).copy_(u.transpose(1, 2))
            if bias:
                x[:, -1] = 1
            channels_last = rows.movedim(2, -1)
            if channels_last.is_contiguous():  # rows from a convolution's pull: (sample, row, position) × C_out
                per_sample = channels_last.reshape(b, -1, out)  # one product per sample: 1.4× one tall GEMM
                s = torch.bmm(per_sample.mT, per_sample).sum(0) / positions
            elif positions >= out:  # Γ from one batched product per row of the whole (contiguous) block, no copy
                full = at.reshape(b * at.shape[1], out, positions)
                s = torch.bmm(full, full.mT).view(b, -1, out, out)[:, :r].sum((0, 1)) / positions
            else:
                lf = rows.reshape(b * r, out, positions).transpose(1, 2).reshape(-1, out)
            if lam is not None:
                lam = lam.reshape(b, out, positions).transpose(1, 2).reshape(-1, out)
            form = "kfc"
        else:
            out, width = node.ops.out_features, node.ops.in_features
            x = ins[0].reshape(-1, width)
            positions = x.shape[0] // b
            lf = rows.reshape(-1, out)
            if lam is not None:
                lam = lam.reshape(-1, out)
            form = "kfac"
        if bias and form == "kfac":
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        if s is None:
            s = lf.T @ lf / positions
        m = x.shape[1]
        if x.shape[0] < m:  # Ω = ZᵀZ by its rows, tr Ω = ‖Z‖²
            z, a = x / b**0.5, None
            trace_a = (z * z).sum()
        else:
            z, a = None, x.T @ x / b
            trace_a = torch.trace(a)
        pi = torch.sqrt((trace_a / m) / (torch.trace(s) / s.shape[0]).clamp_min(1e-300))
        root = self.damping ** 0.5
        f = KroneckerFactors(s, s + (root / pi) * _eye(s.shape[0], s), pi, root * pi, positions, bias, form, a, z)
        return f, (None if lam is None else lam.T @ x)  # the gradient as W̄ (C_out × m), as _solve_kron takes it

    def _sweep(self, theta, *, costate: bool = False, coefficients: bool | None = None, flags: list | None = None):
        """One forward pass on the metric batch and one backward sweep of the factor rows. Per block:
        KroneckerFactors, or K_a (d × n_a) for the exact blocks; and with ``costate`` the block gradients — from
        the coefficients c of the output gradient in the factor rows where they reproduce it (exact blocks
        K_aᵀc, Kronecker blocks from λ recombined at the layer), else with λ riding along as one extra row per
        sample. ``coefficients`` and ``flags`` as for :meth:`Layerwise.direction_rows`."""
        lw, problem = self._layerwise, self.problem
        trace = self.graph.forward(problem.unflatten(theta), lw.inputs)
        y = trace.output
        c = None
        if costate:
            rows, lam, c = lw.direction_rows(y, coefficients=coefficients, flags=flags)
        else:
            rows = lw.output_factor(y)
        r = rows.shape[1]
        if costate and c is None:
            rows = torch.cat([rows, lam[:, None]], dim=1)
        found: list = [None] * len(self.blocks)
        grads: list = [None] * len(self.blocks)

        def visit(node, ins, p, at, k):
            i = self._kron.get(node.name)
            if i is not None:
                found[i], grads[i] = self._kronecker(node, ins, at, r, costate, c)
                return
            k = k if k is not None else node.ops.k_rows(p, ins, at)
            k_rows = k[:, :r].reshape(-1, k.shape[-1])
            for j, cols, bcols in self._collect[node.name]:
                sl = self.blocks[j][1]
                if found[j] is None:
                    found[j] = k.new_zeros(k_rows.shape[0], sl.stop - sl.start)
                    grads[j] = k.new_zeros(sl.stop - sl.start)
                found[j][:, bcols] += k_rows[:, cols]
                if costate and c is None:
                    grads[j][bcols] += k[:, r, cols].sum(0)

        backward(self.graph, trace, rows, visit)
        for j, (_, sl) in enumerate(self.blocks):
            if found[j] is None:  # no path from these parameters to the output: K_a = 0
                found[j] = theta.new_zeros(rows.shape[0] * r, sl.stop - sl.start)
                grads[j] = theta.new_zeros(sl.stop - sl.start)
            elif costate and c is not None and not isinstance(found[j], KroneckerFactors):
                grads[j] = found[j].T @ c
        return found, grads

    def factors(self, theta: torch.Tensor) -> dict:
        """Per block name: its :class:`KroneckerFactors`, or for an "exact" block its factor K_a (d × n_a)."""
        found, _ = self._sweep(theta)
        return {name: f for (name, _), f in zip(self.blocks, found)}

    # -- layouts ------------------------------------------------------------------------------------------
    @staticmethod
    def _as_matrix(f: KroneckerFactors, v):
        """θ's block (W row-major, then b) as W̄ = [W | b] (C_out × m)."""
        out, m = f.s.shape[0], f.inputs
        if not f.bias:
            return v.reshape(out, m)
        return torch.cat([v[: out * (m - 1)].reshape(out, m - 1), v[out * (m - 1):, None]], dim=1)

    @staticmethod
    def _from_matrix(f: KroneckerFactors, mat):
        return torch.cat([mat[:, :-1].reshape(-1), mat[:, -1]]) if f.bias else mat.reshape(-1)

    # -- Metric interface ---------------------------------------------------------------------------------
    def _solve_kron(self, f: KroneckerFactors, v):
        """(Γ + γ_S I)⁻¹ V (Ω + γ_A I)⁻¹ for θ's block ``v``, given as a vector or already as W̄ (C_out × m)."""
        m = spd_solve(f.s_damped, v if v.ndim == 2 else self._as_matrix(f, v))
        if f.a_rows is None:
            m = spd_solve(f.a_damped, m.T).T
        else:  # Woodbury through the few rows of Ω = ZᵀZ
            z, gamma_a = f.a_rows, f.gamma_a
            inner = z @ z.T
            inner.diagonal().add_(gamma_a)
            u = spd_solve(inner, (m @ z.T).T).T
            m = (m - u @ z) / gamma_a
        return self._from_matrix(f, m)

    def _solve_exact(self, k, v):
        d, n = k.shape
        if n < d:
            gram = k.T @ k + self.damping * _eye(n, k)
            return spd_solve(gram, v)
        inner = k @ k.T + self.damping * _eye(d, k)
        u = spd_solve(inner, k @ v)
        return (v - k.T @ u) / self.damping

    def _solve_found(self, found, vectors):
        return torch.cat([self._solve_kron(f, v) if isinstance(f, KroneckerFactors) else self._solve_exact(f, v)
                          for f, v in zip(found, vectors)])

    def _solve_one(self, theta, v):
        found, _ = self._sweep(theta)
        return self._solve_found(found, [v[sl] for _, sl in self.blocks])

    def solve(self, theta, v):
        _check_length(v, self.problem.num_params, "v")
        return batched(self._solve_one, theta, v)

    def _direction_one(self, theta, coefficients=None, flags=None):
        found, grads = self._sweep(theta, costate=True, coefficients=coefficients, flags=flags)
        return self._solve_found(found, grads)

    def natural_direction(self, theta: torch.Tensor) -> torch.Tensor:
        """G(θ)⁻¹∇L(θ) from one sweep, without a separate gradient pass (the gradient from the coefficients of the
        output gradient in the factor rows, or the costate riding along: :meth:`_sweep`); needs the metric on the
        full batch (``metric_batch=None``), otherwise it is ``solve(θ, problem.grad(θ))``."""
        if self._layerwise.indices is not None:
            return self.solve(theta, self.problem.grad(theta))
        if theta.ndim == 1:
            return self._direction_one(theta)
        return ensemble_directions(self._direction_one, theta)

    def _block_matrix(self, f, size):
        if not isinstance(f, KroneckerFactors):
            return f.T @ f + self.damping * _eye(size, f)
        out, m = f.s.shape[0], f.inputs
        idx = torch.arange(out * m, device=f.s.device).reshape(out, m)
        order = self._from_matrix(f, idx)  # θ position → position in vec(W̄)
        return torch.kron(f.s_damped, f.a_damped)[order][:, order]

    def matrix(self, theta):
        found, _ = self._sweep(theta)
        return block_diagonal_matrix(self.problem.num_params, [
            (sl, self._block_matrix(f, sl.stop - sl.start)) for (_, sl), f in zip(self.blocks, found)], theta)

    def describe(self):
        return {"name": "KFAC", "damping": self.damping, "output": self.output, "fallback": self.fallback,
                "forms": dict(self.forms)}
