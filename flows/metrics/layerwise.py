"""The layerwise Riemannian metric of Pehle & Slotine (MATH.md §2.2–2.4) on any module graph.

    L_y = L_o,    L_u = Σ_{v consumes u} L_v ∂f_v/∂x_u,    K_a = L_o ∂y/∂w_a = Σ_{nodes v using w_a} L_v B_v
    G = blockdiag(G_1, …, G_m),    G_a = D_a + K_aᵀK_a     (D_a = μI, or a positive diagonal)

G_a is exactly the a-th diagonal block of μI + JᵀM_oJ, but no global Jacobian is formed: the factor rows are
swept backward over the model's graph (:mod:`flows.modules`) like the costate. Each block is inverted on its own:

    dual   G_a⁻¹g = (1/μ)[g − K_aᵀ(μI_d + K_aK_aᵀ)⁻¹K_a g]     Cholesky of d × d, cost O(n_a d² + d³)
    primal G_a⁻¹g = solve(μI + K_aᵀK_a, g)                      Cholesky of n_a × n_a, cost O(n_a² d + n_a³)

chosen per block (primal when n_a < d); the d × d inner matrices of all dual blocks are factored by one batched
Cholesky. For Linear modules the dual path never materialises K_a (the inner Gram and K_a g, K_aᵀu come from the
factor rows and the layer inputs); Conv, LayerNorm/GroupNorm and Embedding form K_a from their inputs directly;
everything else by per-sample vjps. With the softmax Fisher the factor keeps B(C − 1) rows (its null row reflected
away), which leaves every G_a unchanged.

The natural direction needs no gradient pass where the output gradient is a combination of the factor rows,
λ_b = rows_bᵀc_b (the exact softmax Fisher with cross-entropy, the identity metric with squared error):

    ∇_aL = J_aᵀλ = K_aᵀc,        G_a⁻¹∇_aL = (μI + K_aᵀK_a)⁻¹K_aᵀc = K_aᵀ(μI_d + K_aK_aᵀ)⁻¹c

for every block at once, so the sweep carries the factor rows alone and neither the block gradient nor K_a g is
formed (:meth:`Layerwise.natural_direction`).

Not used, on purpose: the block of a Linear layer that produces softmax logits, μI + Σ_b (diag p_b − p_bp_bᵀ)/B ⊗
x̃_bx̃_bᵀ, can be inverted by a Woodbury per class (C systems of size B) and a second one for the rank-B part −ppᵀ,
in place of the d × d dual. It was 0.2 ms faster on the benchmark MLP (2.44 against 2.64 ms, min of an in-process
A/B) and agreed with the dual to 1e-15 there, but the nested inversion loses accuracy as cond² where the layer's
inputs are (nearly) linearly dependent — a repeated sample suffices: 4e-4 against 2.4e-10 relative error at
μ = 1e-6 with 8 of 32 samples repeated. The dual's Cholesky keeps rounding × cond in every case.
"""

from __future__ import annotations

import torch

from flows.linalg import gram, spd_solve
from flows.metrics._base import Metric, _check_length, _positive_float, batched, block_diagonal_matrix
from flows.metrics.natural_gradient import select_metric_batch
from flows.metrics.output import (
    check_separable,
    coefficients_reproduce,
    gradient_coefficients,
    output_rows,
    reduced_fisher_rows,
    resolve_output,
)
from flows.modules import backward, read
from flows.problem import output_gradient

SOLVERS = ("auto", "dual", "primal")


def _eye(n, like):
    return torch.eye(n, dtype=like.dtype, device=like.device)


def _param_spans(problem) -> dict[str, tuple[int, int]]:
    """θ offsets (start, stop) of every named parameter, from ``problem.blocks``."""
    spans = {}
    for block in problem.blocks:
        start = block.start
        for name, shape in zip(block.param_names, block.shapes):
            spans[name] = (start, start + shape.numel())
            start += shape.numel()
    return spans


def resolve_blocks(problem, blocks) -> list[tuple[str, slice, tuple[str, ...]]]:
    """(name, slice of θ, parameter names) per block, in θ order, tiling θ.

    ``blocks`` is None (``problem.blocks``: one per module that owns parameters, or the Problem's own ``blocks=``),
    a list of :class:`flows.problem.Block` or (name, slice) pairs, or a specification for
    :meth:`flows.Problem.group_blocks` (name patterns, lists of them, or a mapping from block names to patterns)."""
    spans = _param_spans(problem)
    names = list(spans)
    if blocks is None:
        return [(b.name, b.slice, tuple(b.param_names)) for b in problem.blocks]
    pairs = isinstance(blocks, list | tuple) and blocks and all(
        (hasattr(item, "slice") and hasattr(item, "name")) or
        (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], slice)) for item in blocks)
    if not pairs:
        return [(b.name, b.slice, tuple(b.param_names)) for b in problem.group_blocks(blocks)]
    out = []
    for item in blocks:
        name, sl = (item.name, item.slice) if hasattr(item, "slice") else item
        inside = tuple(n for n in names if sl.start <= spans[n][0] < sl.stop)
        if not inside or spans[inside[0]][0] != sl.start or spans[inside[-1]][1] != sl.stop:
            raise ValueError(f"block {name!r} (θ[{sl.start}:{sl.stop}]) must cover whole parameters")
        out.append((name, sl, inside))
    out.sort(key=lambda b: b[1].start)
    covered = [(s.start, s.stop) for _, s, _ in out]
    if covered[0][0] != 0 or covered[-1][1] != problem.num_params or any(
            a[1] != b[0] for a, b in zip(covered, covered[1:])):
        raise ValueError(f"blocks must tile θ (0…{problem.num_params}) without gaps or overlaps; got spans {covered}")
    return out


def ensemble_directions(direction_one, theta: torch.Tensor) -> torch.Tensor:
    """Natural directions of an ensemble θ (..., N) by one vmapped sweep per member, ``direction_one(θ,
    coefficients=…, flags=…)`` as :meth:`Layerwise.direction_rows` describes: first every member by the
    coefficients of its output gradient, their test returned alongside (vmap cannot branch on it); only if some
    member's coefficients do not reproduce its gradient, all again with the costate riding along. No pass is added
    where the coefficients serve, which is the common case."""
    flat = theta.reshape(-1, theta.shape[-1])

    def by_coefficients(t):
        flags: list = []
        direction = direction_one(t, coefficients=True, flags=flags)
        return direction, torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool)

    directions, reproduced = torch.func.vmap(by_coefficients)(flat)
    if not bool(reproduced.all()):
        directions = torch.func.vmap(lambda t: direction_one(t, coefficients=False))(flat)
    return directions.reshape(theta.shape)


class Layerwise(Metric):
    """Block-diagonal layerwise metric G_a = μI + K_aᵀK_a over the blocks of θ (MATH.md §2.2–2.4).

    The model is read as a module graph (:func:`flows.modules.read`, torch.fx); costates and factor rows are swept
    backward over it, summed over consumers, so K_a = L_o ∂y/∂w_a and G_a is exactly the diagonal block of
    μI + JᵀM_oJ for the parameters of block a — for residual, branching, convolutional and attention models alike.
    A module called more than once contributes the sum of its calls' K. A model the graph reader refuses
    (untraceable control flow, in-place operations, batch norm in training mode, ops mixing samples) raises a
    ValueError naming the module; the metric never falls back to another one.

    Args:
        problem: a :class:`flows.Problem`.
        mu: the mass μ > 0 of every block; ``mass`` overrides it per block name with a scalar or a positive
            diagonal (n_a,).
        output: output metric, as for :class:`NaturalGradient` (``"auto"``, ``"identity"``, ``"fisher"``,
            ``"ggn"``, ``"sampled_fisher"`` with ``probes`` rows per sample).
        metric_batch: samples in the metric (None: all); a count picks a fixed subset with ``seed``.
        solver: ``"auto"`` (primal when n_a < d), ``"dual"`` or ``"primal"``.
        structured: use the structured operators (Linear: Gram, K g and Kᵀu without K); False: the generic
            per-sample VJP path everywhere.
        blocks: None (``problem.blocks``, one per module that owns parameters) or a list of blocks — see
            :func:`resolve_blocks` (Block objects, (name, slice) pairs, or name patterns as for
            :meth:`flows.Problem.group_blocks`). A block that is not exactly one module called once (a group of
            modules, a module called twice, tied weights) collects its K columns from every node that touches it.
    """

    def __init__(self, problem, mu: float = 1.0, output: str = "auto", metric_batch=None, *, seed: int = 0,
                 probes: int = 1, solver: str = "auto", structured: bool = True, blocks=None, mass=None):
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose one of {list(SOLVERS)}")
        self.problem = problem
        self.mu = _positive_float(mu, "mu")
        self.output = resolve_output(output, problem.loss_name)
        self.solver, self.structured, self.probes, self.seed = solver, structured, int(probes), seed
        self.indices = select_metric_batch(metric_batch, problem.batch_size, seed, problem.device)
        self.inputs = problem.inputs if self.indices is None else problem.inputs[self.indices]
        self.targets = problem.targets if self.indices is None else problem.targets[self.indices]
        self.graph = read(problem.model, structured=structured)
        self.graph.check_per_sample(problem.unflatten(problem.theta0), self.inputs)
        resolved = resolve_blocks(problem, blocks)
        self._plan(problem, resolved)
        self._mass = {}
        for name, value in (mass or {}).items():
            size = next((s.stop - s.start for n, s, _ in self.blocks if n == name), None)
            if size is None:
                raise ValueError(f"mass given for unknown block {name!r}; blocks are {[n for n, _, _ in self.blocks]}")
            value = torch.as_tensor(value, dtype=problem.dtype, device=problem.device)
            if value.ndim == 0:
                value = value.expand(size)
            if value.shape != (size,) or not bool((value > 0).all()):
                raise ValueError(f"mass of block {name!r} must be positive with shape ({size},)")
            self._mass[name] = value
        if self.output == "ggn":
            check_separable(problem._outputs(problem.theta0, self.inputs), self.targets, problem.loss_fn)

    def _plan(self, problem, resolved):
        """Which blocks a node's K feeds. A block that is exactly one module node's parameters, called once, is
        solved at that node (structured where the node has a structured operator); any other block (a module
        called twice, parameters read directly, a block spanning modules or part of one) collects its K columns
        from every node that touches it and is solved after the sweep."""
        spans = _param_spans(problem)
        owner = {}
        for i, (_, _, names) in enumerate(resolved):
            for n in names:
                owner[n] = i
        calls: dict = {}
        for node in self.graph.module_nodes:
            for n in node.param_names:
                calls[n] = calls.get(n, 0) + 1
        self._direct: dict = {}  # node name → block index
        self._collect: dict = {}  # node name → [(block index, node columns, block columns)]
        blocks = []
        for i, (name, sl, names) in enumerate(resolved):
            direct = [v for v in self.graph.module_nodes if v.kind == "module" and v.param_names == names
                      and all(calls[n] == 1 for n in names)]
            blocks.append((name, sl, direct[0].ops if direct else None))
            if direct:
                self._direct[direct[0].name] = i
        for node in self.graph.module_nodes:
            if node.name in self._direct:
                continue
            pieces, col = [], 0
            for n in node.param_names:
                size = spans[n][1] - spans[n][0]
                i = owner[n]
                start = spans[n][0] - resolved[i][1].start
                pieces.append((i, slice(col, col + size), slice(start, start + size)))
                col += size
            self._collect[node.name] = pieces
        self.blocks = blocks
        self._block_params = [names for _, _, names in resolved]

    # -- the sweep ---------------------------------------------------------------------------------------
    def output_factor(self, outputs: torch.Tensor, lam: torch.Tensor | None = None, *, check: bool = True):
        """The output metric's factor rows at the network outputs, shaped (B, R, *y_b.shape): the rows the sweep
        starts from (softmax Fisher: B(C − 1) rows after the null row is reflected away, :func:`reduced_fisher_rows`).

        Given the output gradient ``lam``, returns (rows, c): the coefficients c (B·R,) with rows_bᵀc_b = λ_b
        (:func:`gradient_coefficients`), or None where λ is not in the rows' span or c would not reproduce it
        accurately (:func:`coefficients_reproduce`; ``check=False`` skips that test, for a caller that made it)."""
        if self.output == "fisher" and outputs.ndim == 2 and outputs.shape[1] > 1:
            rows, c = (reduced_fisher_rows(outputs), None) if lam is None else reduced_fisher_rows(outputs, lam)
        else:
            rows = output_rows(self.output, outputs, self.targets, self.problem.loss_fn, probes=self.probes,
                               seed=self.seed)
            c = None if lam is None else gradient_coefficients(self.output, outputs, lam)
        if c is not None and check and not bool(coefficients_reproduce(rows, c, lam)):
            c = None
        rows = rows.reshape(*rows.shape[:2], *outputs.shape[1:])
        return (rows, None if c is None else c.reshape(-1)) if lam is not None else rows

    def direction_rows(self, outputs: torch.Tensor, *, coefficients: bool | None = None, flags: list | None = None):
        """What a natural-direction sweep starts from at the network outputs: (rows, λ, c) with λ the output gradient
        and c its coefficients in the rows (:meth:`output_factor`), or None where λ must ride along as a row.
        ``coefficients``: None — c where :func:`coefficients_reproduce` accepts it; False — never; True — c
        unchecked, its test appended to ``flags`` as a boolean tensor (under ``vmap``, which cannot branch on it,
        :func:`ensemble_directions` reads it afterwards)."""
        lam = output_gradient(self.problem.loss_fn, outputs, self.targets)
        if coefficients is False:
            return self.output_factor(outputs), lam, None
        rows, c = self.output_factor(outputs, lam, check=coefficients is None)
        if coefficients and c is not None:
            flags.append(coefficients_reproduce(rows, c.reshape(rows.shape[:2]), lam))
        return rows, lam, c

    def _run(self, theta, on_direct, on_collect, *, costate: bool = False, coefficients: bool | None = None,
             flags: list | None = None):
        """Forward on the metric batch and the backward sweep of factor rows. ``on_direct(i, node, ins, p, rows,
        grad, k)`` at nodes that are a whole block; ``on_collect(node, k, grad)`` with K (d × n_node) and the node
        gradient at the others.

        With ``costate`` the sweep serves the natural direction. Where the output gradient λ is a combination
        rowsᵀc of the factor rows (:meth:`output_factor`), every block gradient is K_aᵀc and the sweep carries the
        factor rows alone: grad is None, on_direct gets c as its last argument, and c is returned. Otherwise λ
        rides along as one extra row per sample, grad is the block gradient, and c is None. ``coefficients`` and
        ``flags`` as for :meth:`direction_rows`."""
        params = self.problem.unflatten(theta)
        trace = self.graph.forward(params, self.inputs)
        y = trace.output
        c = None
        if costate:
            rows, lam, c = self.direction_rows(y, coefficients=coefficients, flags=flags)
            costate = c is None
        else:
            rows = self.output_factor(y)
        r = rows.shape[1]
        if costate:
            rows = torch.cat([rows, lam[:, None]], dim=1)

        def visit(node, ins, p, ext, k):
            if isinstance(ext, tuple):  # a module with several outputs (attention): one row block per output
                rows_, lam = (tuple(e[:, :r] for e in ext), tuple(e[:, r] for e in ext)) if costate else (ext, None)
            else:
                rows_, lam = (ext[:, :r], ext[:, r]) if costate else (ext, None)
            k_rows = None if k is None else k[:, :r]
            grad = None
            if costate:
                grad = k[:, r].sum(0) if k is not None else node.ops.vjp_param(p, ins, lam)
            if node.name in self._direct:
                on_direct(self._direct[node.name], node, ins, p, rows_, grad, k_rows, c)
            else:
                k_rows = k_rows if k_rows is not None else node.ops.k_rows(p, ins, rows_)
                on_collect(node, k_rows.reshape(-1, k_rows.shape[-1]), grad)

        backward(self.graph, trace, rows, visit)
        return c

    def _gather(self, theta, vectors, *, costate: bool = False, solve: bool = True, coefficients=None, flags=None):
        """Per block: the solve G_a⁻¹ v_a (``solve``) or K_a (not ``solve``); with ``costate`` v is the gradient
        (as K_aᵀc where the sweep found coefficients c, see :meth:`_run`)."""
        out = [None] * len(self.blocks)
        k_acc: dict = {}
        g_acc: dict = {}

        def on_direct(i, node, ins, p, rows, grad, k, c):
            if solve:
                v = vectors[self.blocks[i][1]] if not costate else grad
                out[i] = self._solve_block(self.blocks[i][0], node.ops, ins, p, rows, v, k, c)
            else:
                out[i] = (k if k is not None else node.ops.k_rows(p, ins, rows)).reshape(rows.shape[0] *
                                                                                          rows.shape[1], -1)

        def on_collect(node, k, grad):
            for i, cols, bcols in self._collect[node.name]:
                sl = self.blocks[i][1]
                if i not in k_acc:
                    k_acc[i] = k.new_zeros(k.shape[0], sl.stop - sl.start)
                    g_acc[i] = k.new_zeros(sl.stop - sl.start)
                k_acc[i][:, bcols] += k[:, cols]
                if grad is not None:
                    g_acc[i][bcols] += grad[cols]

        c = self._run(theta, on_direct, on_collect, costate=costate, coefficients=coefficients, flags=flags)
        d = None
        for i, (name, sl, _) in enumerate(self.blocks):
            if out[i] is not None:
                continue
            if i not in k_acc:  # no path from these parameters to the output: K_a = 0
                d = d or self._rows_count()
                k_acc[i] = theta.new_zeros(d, sl.stop - sl.start)
                g_acc[i] = theta.new_zeros(sl.stop - sl.start)
            if solve:
                v = (k_acc[i].T @ c if c is not None else g_acc[i]) if costate else vectors[sl]
                out[i] = self._solve_dense_factor(name, k_acc[i], v)
            else:
                out[i] = k_acc[i]
        return self._finish(out) if solve else out

    def _rows_count(self) -> int:
        y = self.problem.outputs(self.problem.theta0, self.inputs)
        return int(self.output_factor(y).shape[0] * self.output_factor(y).shape[1])

    def sweep(self, theta: torch.Tensor, visit, *, costate: bool = False):
        """Compatibility sweep for peers: ``visit(name, slice, ops, x, p, rows, lam)`` at every module node that is a
        whole block, with its single tensor input ``x`` (rows flattened to (B, R, width))."""
        def on_direct(i, node, ins, p, rows, grad, k, c):
            name, sl, _ = self.blocks[i]
            visit(name, sl, node.ops, ins[0] if len(ins) == 1 else ins, p, rows, None)

        self._run(theta, on_direct, lambda node, k, grad: None, costate=False)

    def _use_primal(self, n, d):
        return self.solver == "primal" or (self.solver == "auto" and n < d)

    def _solve_block(self, name, ops, ins, p, rows, g, k=None, c=None):
        """G_a⁻¹ g, or — for a dual solve with mass μI — the pending (KKᵀ, rhs, u ↦ x), so that all blocks' d × d
        inner matrices are factored after the sweep. With coefficients c in place of g (g = K_aᵀc, see
        :meth:`_run`): G_a⁻¹g = K_aᵀ(μI + K_aK_aᵀ)⁻¹c, without K_a g."""
        d, n = rows.shape[0] * rows.shape[1], sum(t.numel() for t in p.values())  # p: the whole block
        mass = self._mass.get(name)
        dual = mass is None and not self._use_primal(n, d)
        if k is None and dual and hasattr(ops, "dual") and ops.has_gram(ins):
            inner, k_mv, k_t = ops.dual(ins, rows)
            if c is not None:
                return (inner, c, k_t)
            return (inner, k_mv(g), lambda u: (g - k_t(u)) / self.mu)
        k = (k if k is not None else ops.k_rows(p, ins, rows)).reshape(d, n)
        if dual:
            if c is not None:
                return (gram(k), c, lambda u: k.T @ u)
            return (gram(k), k @ g, lambda u: (g - k.T @ u) / self.mu)
        return self._solve_dense_factor(name, k, g if c is None else k.T @ c)

    def _finish(self, out):
        """Finish every pending dual block: Cholesky of its μI + KKᵀ (in place, one LAPACK call per block; stacking
        the blocks for one batched call costs a copy of every d × d matrix and saves nothing on CPU) and two
        triangular solves."""
        for i, item in enumerate(out):
            if not isinstance(item, tuple):
                continue
            inner, rhs, finish = item
            inner.diagonal().add_(self.mu)
            out[i] = finish(spd_solve(inner, rhs))
        return out

    def _solve_dense_factor(self, name, k, g):
        d, n = k.shape
        mass = self._mass.get(name)
        if self._use_primal(n, d):
            gmat = k.T @ k + (torch.diag(mass) if mass is not None else self.mu * _eye(n, g))
            return spd_solve(gmat, g)
        d_inv = 1.0 / mass if mass is not None else torch.full_like(g, 1.0 / self.mu)
        k_scaled = k * d_inv  # K D⁻¹
        inner = _eye(d, g) + k_scaled @ k.T  # I + K D⁻¹ Kᵀ
        u = spd_solve(inner, k_scaled @ g)
        return d_inv * g - k_scaled.T @ u

    # -- Metric interface ---------------------------------------------------------------------------------
    def _solve_one(self, theta, v):
        return torch.cat(self._gather(theta, v))

    def solve(self, theta, v):
        _check_length(v, self.problem.num_params, "v")
        return batched(self._solve_one, theta, v)

    def _direction_one(self, theta, coefficients=None, flags=None):
        return torch.cat(self._gather(theta, None, costate=True, coefficients=coefficients, flags=flags))

    def natural_direction(self, theta: torch.Tensor) -> torch.Tensor:
        """G(θ)⁻¹∇L(θ) from one sweep, without a separate gradient pass. Where the output gradient is a combination
        λ_b = rows_bᵀc_b of the factor rows (softmax cross-entropy with the exact Fisher, squared error with the
        identity metric), ∇_aL = K_aᵀc and the direction is K_aᵀ(μI + K_aK_aᵀ)⁻¹c per block; otherwise the costate
        rides along with the factor rows. Needs the metric on the full batch (``metric_batch=None``); otherwise it
        is ``solve(θ, problem.grad(θ))``."""
        if self.indices is not None:
            return self.solve(theta, self.problem.grad(theta))
        if theta.ndim == 1:
            return self._direction_one(theta)
        return ensemble_directions(self._direction_one, theta)

    def block_factors(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """K_a materialised per block (d × n_a), for tests and diagnostics. Memory O(d·N)."""
        found = self._gather(theta, theta, solve=False)
        return {name: k for (name, _, _), k in zip(self.blocks, found)}

    def derivative_operator(self, theta: torch.Tensor, direction: torch.Tensor):
        """v ↦ Ġv, Ġ = DG(θ)[direction], as a product of materialised factors (MATH.md §5, the moving metric):

            Ġ_a = K̇_aᵀK_a + K_aᵀK̇_a,     K̇_a = DK_a(θ)[direction]      (the mass μI or D_a does not move)

        K and K̇ come from one forward-mode pass of the factor sweep (memory 2·d·N, like two :meth:`block_factors`);
        every product then costs O(d·N) — instead of a forward-mode pass of the whole sweep per vector, as a JVP of
        :meth:`apply` takes. :func:`flows.contraction.metric_derivative` uses it."""
        theta, direction = theta.detach(), direction.detach()
        _check_length(direction, self.problem.num_params, "direction")
        factors, rates = torch.func.jvp(self.block_factors, (theta,), (direction,))
        pairs = [(sl, factors[name], rates[name]) for name, sl, _ in self.blocks]

        def product(v):
            _check_length(v, self.problem.num_params, "v")
            return torch.cat([kd.T @ (k @ v[sl]) + k.T @ (kd @ v[sl]) for sl, k, kd in pairs])

        return product

    def _mass_matrix(self, name, n, like):
        mass = self._mass.get(name)
        return torch.diag(mass) if mass is not None else self.mu * _eye(n, like)

    def matrix(self, theta):
        factors = self.block_factors(theta)
        return block_diagonal_matrix(self.problem.num_params, [
            (sl, factors[name].T @ factors[name] + self._mass_matrix(name, sl.stop - sl.start, theta))
            for name, sl, _ in self.blocks], theta)

    def _apply_one(self, theta, v):
        factors = self.block_factors(theta)
        out = []
        for name, sl, _ in self.blocks:
            k = factors[name]
            mass = self._mass.get(name)
            out.append(k.T @ (k @ v[sl]) + (mass * v[sl] if mass is not None else self.mu * v[sl]))
        return torch.cat(out)

    def apply(self, theta, v):
        _check_length(v, self.problem.num_params, "v")
        return batched(self._apply_one, theta, v)

    def diagnostics(self, theta: torch.Tensor, grad: torch.Tensor | None = None) -> list[dict]:
        """Per block: size n_a, factor rows d, path (primal/dual), inner condition number
        ξ_a = cond(I + K_aK_aᵀ/μ), rank of K_a, residual ‖G_a x_a − g_a‖ of the solve, and ‖x_a‖."""
        grad = self.problem.grad(theta) if grad is None else grad
        x = self.solve(theta, grad)
        factors = self.block_factors(theta)
        report = []
        for name, sl, _ in self.blocks:
            k = factors[name]
            d, n = k.shape
            mass = self._mass.get(name)
            scale = mass.min() if mass is not None else torch.tensor(self.mu, dtype=k.dtype)
            eig = torch.linalg.eigvalsh(k @ k.T)
            residual = k.T @ (k @ x[sl]) + self._mass_matrix(name, n, theta) @ x[sl] - grad[sl]
            report.append({
                "block": name, "size": n, "rows": d, "path": "primal" if self._use_primal(n, d) else "dual",
                "xi": float(1 + eig[-1].clamp_min(0) / scale) / float(1 + eig[0].clamp_min(0) / scale),
                "rank": int(torch.linalg.matrix_rank(k)),
                "residual": float(torch.linalg.vector_norm(residual)),
                "update_norm": float(torch.linalg.vector_norm(x[sl])),
            })
        return report

    def describe(self):
        return {"name": "Layerwise", "mu": self.mu, "output": self.output, "solver": self.solver,
                "blocks": [name for name, _, _ in self.blocks],
                "block_params": {name: list(params) for (name, _, _), params in zip(self.blocks, self._block_params)},
                "metric_batch": None if self.indices is None else int(self.indices.numel())}
