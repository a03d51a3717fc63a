"""The layerwise Riemannian metric of Pehle & Slotine (MATH.md §2.2).

    L_m = L_o,    L_{a−1} = L_a A_a,    K_a = L_a B_a   (d × n_a, d = B·R factor rows)
    G = blockdiag(G_1, …, G_m),    G_a = D_a + K_aᵀK_a     (D_a = μI, or a positive diagonal)

G_a is exactly the a-th diagonal block of μI + JᵀM_oJ, but no global Jacobian is formed: the factor rows are
swept backward through the modules like the costate. Each block is inverted on its own:

    dual   G_a⁻¹g = (1/μ)[g − K_aᵀ(μI_d + K_aK_aᵀ)⁻¹K_a g]     Cholesky of d × d, cost O(n_a d² + d³)
    primal G_a⁻¹g = solve(μI + K_aᵀK_a, g)                      Cholesky of n_a × n_a, cost O(n_a² d + n_a³)

chosen per block (primal when n_a < d). For Linear modules the dual path never materialises K_a: the inner Gram
and the products K_a g, K_aᵀu come from the factor rows and the layer inputs.
"""

from __future__ import annotations

import torch

from flows.metrics._base import Metric, _check_length, _positive_float, batched, block_diagonal_matrix
from flows.metrics.natural_gradient import NaturalGradient, select_metric_batch
from flows.metrics.output import check_separable, output_rows, resolve_output
from flows.modules import LinearOps, _backward, _forward, leaves, structure

SOLVERS = ("auto", "dual", "primal")


def _eye(n, like):
    return torch.eye(n, dtype=like.dtype, device=like.device)


def _block_slices(problem, tree) -> list[tuple[str, slice, object]]:
    """(name, slice of θ, leaf) for every leaf with parameters; checks they tile θ in order."""
    offsets, start = {}, 0
    for name, numel in zip(problem._names, problem._numels):
        offsets[name] = (start, start + numel)
        start += numel
    blocks, expected = [], 0
    for leaf in leaves(tree):
        if not leaf.has_params:
            continue
        spans = [offsets[n] for n in leaf.names]
        lo, hi = spans[0][0], spans[-1][1]
        if lo != expected or any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
            raise ValueError(f"the parameters of module {leaf.prefix!r} are not contiguous in θ")
        blocks.append((leaf.prefix, slice(lo, hi), leaf))
        expected = hi
    if expected != problem.num_params:
        raise ValueError(f"the modules' parameters cover {expected} of the problem's {problem.num_params} parameters")
    return blocks


class Layerwise(Metric):
    """Block-diagonal layerwise metric G_a = μI + K_aᵀK_a, one block per module with parameters.

    Args:
        problem: a :class:`flows.Problem` whose model is a chain of modules (``nn.Sequential``,
            :class:`flows.modules.Chain` / ``Parallel`` of Linear, activation and any other per-sample modules).
            For any other model pass ``blocks``.
        mu: the mass μ > 0 of every block; ``mass`` overrides it per block name with a scalar or a positive
            diagonal (n_a,).
        output: output metric, as for :class:`NaturalGradient` (``"auto"``, ``"identity"``, ``"fisher"``,
            ``"ggn"``, ``"sampled_fisher"`` with ``probes`` rows per sample).
        metric_batch: samples in the metric (None: all); a count picks a fixed subset with ``seed``.
        solver: ``"auto"`` (primal when n_a < d), ``"dual"`` or ``"primal"``.
        structured: use the closed forms for Linear modules (False: the generic per-sample VJP path everywhere).
        blocks: for a model that is not a chain: a list of (name, slice) that tiles θ (``problem.blocks`` is
            one); K comes from per-sample Jacobians of the whole model and each block is inverted as above.
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
        if blocks is None:
            self.tree = structure(problem.model, structured=structured)
            self.blocks = _block_slices(problem, self.tree)
            self._jacobian_metric = None
        else:
            self.tree = None
            self.blocks = [(getattr(b, "name", None) or b[0], getattr(b, "slice", None) or b[1], None) for b in blocks]
            covered = sorted((s.start, s.stop) for _, s, _ in self.blocks)
            if covered[0][0] != 0 or covered[-1][1] != problem.num_params or any(
                    a[1] != b[0] for a, b in zip(covered, covered[1:])):
                raise ValueError(f"blocks must tile θ (0…{problem.num_params}) without gaps or overlaps; "
                                 f"got spans {covered}")
            self._jacobian_metric = NaturalGradient(problem, mu, output, metric_batch, seed=seed, probes=probes)
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

    # -- the sweep ---------------------------------------------------------------------------------------
    def _rows(self, outputs):
        return output_rows(self.output, outputs, self.targets, self.problem.loss_fn, probes=self.probes,
                           seed=self.seed)

    def sweep(self, theta: torch.Tensor, visit, *, costate: bool = False):
        """Forward on the metric batch, then the backward sweep of factor rows (and, with ``costate``, the
        costate λ as one extra row per sample). ``visit(name, slice, leaf, x, p, rows, lam)`` per block."""
        params = self.problem.unflatten(theta)
        trace: dict = {}
        y = _forward(self.tree, self.inputs, params, trace)
        rows = self._rows(y)
        r = rows.shape[1]
        if costate:
            lam = torch.func.grad(lambda out: self.problem.loss_fn(out, self.targets))(y)
            rows = torch.cat([rows, lam.reshape(lam.shape[0], 1, -1)], dim=1)
        by_leaf = {id(leaf): (name, sl) for name, sl, leaf in self.blocks}

        def on_leaf(leaf, x, p, ext_rows):
            if id(leaf) in by_leaf:
                name, sl = by_leaf[id(leaf)]
                visit(name, sl, leaf, x, p, ext_rows[:, :r], ext_rows[:, r] if costate else None)

        _backward(self.tree, rows, params, trace, on_leaf, need_input=False)

    def _use_primal(self, n, d):
        return self.solver == "primal" or (self.solver == "auto" and n < d)

    def _solve_block(self, name, leaf, x, p, rows, g):
        d, n = rows.shape[0] * rows.shape[1], g.shape[-1]
        mass = self._mass.get(name)
        if mass is None and not self._use_primal(n, d) and isinstance(leaf, LinearOps):
            inner = leaf.gram(x, rows) + self.mu * _eye(d, g)
            u = torch.cholesky_solve(leaf.k_mv(x, rows, g)[:, None], torch.linalg.cholesky(inner))[:, 0]
            return (g - leaf.k_t(x, rows, u)) / self.mu
        return self._solve_dense_factor(name, leaf.k_rows(x, p, rows).reshape(d, n), g)

    def _solve_dense_factor(self, name, k, g):
        d, n = k.shape
        mass = self._mass.get(name)
        if self._use_primal(n, d):
            gmat = k.T @ k + (torch.diag(mass) if mass is not None else self.mu * _eye(n, g))
            return torch.cholesky_solve(g[:, None], torch.linalg.cholesky(gmat))[:, 0]
        d_inv = 1.0 / mass if mass is not None else torch.full_like(g, 1.0 / self.mu)
        k_scaled = k * d_inv  # K D⁻¹
        inner = _eye(d, g) + k_scaled @ k.T  # I + K D⁻¹ Kᵀ
        u = torch.cholesky_solve((k_scaled @ g)[:, None], torch.linalg.cholesky(inner))[:, 0]
        return d_inv * g - k_scaled.T @ u

    # -- Metric interface ---------------------------------------------------------------------------------
    def _solve_one(self, theta, v):
        if self.tree is None:
            k = self._jacobian_metric.factor(theta)
            return torch.cat([self._solve_dense_factor(name, k[:, sl], v[sl]) for name, sl, _ in self.blocks])
        out = [None] * len(self.blocks)
        order = {name: i for i, (name, _, _) in enumerate(self.blocks)}

        def visit(name, sl, leaf, x, p, rows, lam):
            out[order[name]] = self._solve_block(name, leaf, x, p, rows, v[sl])

        self.sweep(theta, visit)
        return torch.cat(out)

    def solve(self, theta, v):
        _check_length(v, self.problem.num_params, "v")
        return batched(self._solve_one, theta, v)

    def _direction_one(self, theta):
        out = [None] * len(self.blocks)
        order = {name: i for i, (name, _, _) in enumerate(self.blocks)}

        def visit(name, sl, leaf, x, p, rows, lam):
            out[order[name]] = self._solve_block(name, leaf, x, p, rows, leaf.vjp_param(x, p, lam))

        self.sweep(theta, visit, costate=True)
        return torch.cat(out)

    def natural_direction(self, theta: torch.Tensor) -> torch.Tensor:
        """G(θ)⁻¹∇L(θ) from one fused sweep: the costate rides along with the factor rows, so no separate
        gradient pass is made. Needs the metric on the full batch (``metric_batch=None``) and a chain model;
        otherwise it is ``solve(θ, problem.grad(θ))``."""
        if self.tree is None or self.indices is not None:
            return self.solve(theta, self.problem.grad(theta))
        return batched(self._direction_one, theta)

    def block_factors(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """K_a materialised per block (d × n_a), for tests and diagnostics. Memory O(d·N)."""
        if self.tree is None:
            k = self._jacobian_metric.factor(theta)
            return {name: k[:, sl] for name, sl, _ in self.blocks}
        found = {}

        def visit(name, sl, leaf, x, p, rows, lam):
            found[name] = leaf.k_rows(x, p, rows).reshape(rows.shape[0] * rows.shape[1], -1)

        self.sweep(theta, visit)
        return found

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
                "metric_batch": None if self.indices is None else int(self.indices.numel())}
