"""Learning rules as vector fields f(t, θ) → dθ/dt, ready for :func:`flows.simulate`.

Any callable ``f(t, θ)`` returning a tensor shaped like θ is a valid field; the classes here also carry the
``problem`` they act on, so that simulate can record the loss along the way.
"""

from __future__ import annotations

import torch

from flows.metrics import Euclidean, Metric
from flows.problem import Problem


class GradientFlow:
    """The Riemannian gradient flow θ̇ = −G(θ)⁻¹ ∇L(θ) (MATH.md §1).

    Along it dL/dt = −‖∇L‖²_{G⁻¹} ≤ 0. With G = I it is the continuous limit of gradient descent.
    Cost per evaluation: one gradient (forward + backward pass) plus one ``metric.solve``.
    θ may be a batch (E, N): every member moves under its own metric.
    """

    def __init__(self, problem: Problem, metric: Metric | None = None):
        if not isinstance(problem, Problem):
            raise TypeError(f"problem must be a flows.Problem, got {type(problem).__name__}")
        self.problem = problem
        self.metric = Euclidean() if metric is None else metric

        # a metric that can produce G⁻¹∇L in one pass (the layerwise fused sweep) is asked for it directly
        self._fused = getattr(self.metric, "natural_direction", None)

    @property
    def symmetric_jacobian(self) -> bool:
        """True when ∂f/∂θ is symmetric: under a Euclidean metric f = −∇L/scale, so J = −∇²L/scale. Analyses may then
        take J v as the vector–Jacobian product Jᵀv (reverse over reverse), cheaper than forward mode here."""
        return isinstance(self.metric, Euclidean)

    def __call__(self, t: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        if self._fused is not None:
            return -self._fused(theta)
        return -self.metric.solve(theta, self.problem.grad(theta))

    def describe(self) -> dict:
        return {"name": "GradientFlow", "metric": self.metric.describe()}

    def __repr__(self) -> str:
        return f"GradientFlow({self.problem!r}, {self.metric!r})"


def _chain_leaves(problem, rule: str):
    """The nodes of a plain chain of Linear and elementwise activation modules (what FA and DFA need)."""
    from flows.modules import ActivationOps, LinearOps, read

    graph = read(problem.model)
    found = [n for n in graph.nodes if n.kind not in ("input", "output")]
    previous = graph.nodes[0].name
    for node in found:
        if not isinstance(node.ops, LinearOps | ActivationOps) or node.inputs != [previous]:
            kinds = sorted({type(n.ops).__name__.removesuffix("Ops") for n in found})
            raise ValueError(f"{rule} needs a chain of Linear and activation layers; this model has {kinds}")
        previous = node.name
    return graph, found


def _feedback_matrix(name, shape, fan_in, given, generator, problem):
    """The given feedback matrix for module ``name``, or U(−1/√fan_in, 1/√fan_in) — the scale torch gives Linear
    weights, so random feedback matches the forward scale."""
    if given is None:
        draw = torch.rand(shape, generator=generator, dtype=problem.dtype) * 2 - 1
        return (draw / fan_in**0.5).to(problem.device)
    matrix = torch.as_tensor(given, dtype=problem.dtype, device=problem.device)
    if matrix.shape != shape:
        raise ValueError(f"feedback for {name!r} must have shape {shape}, got {tuple(matrix.shape)}")
    return matrix


class FeedbackAlignment:
    """Feedback alignment (Lillicrap et al. 2016): backprop with each Linear layer's Wᵀ in the backward pass
    replaced by a fixed random matrix, θ̇ = −ĝ(θ).

    The costate is swept backward with λ_{a−1} = F_aᵀλ_a in place of W_aᵀλ_a, through fixed feedback matrices
    F_a (the shape of W_a, drawn with ``seed`` at torch's Linear scale, or given in ``feedback`` by module name);
    each layer updates from its own inputs, ĝ_a = λ_a x_{a−1}ᵀ. With F_a = W_a it is exactly backprop. Cost: one
    forward and one backward sweep.
    """

    def __init__(self, problem: Problem, seed: int = 0, feedback: dict | None = None):
        from flows.modules import LinearOps

        self.problem = problem
        self.tree, self.leaves = _chain_leaves(problem, "FeedbackAlignment")
        gen = torch.Generator().manual_seed(seed)
        self.feedback = {}
        for leaf in self.leaves:
            if isinstance(leaf.ops, LinearOps):
                self.feedback[leaf.module] = _feedback_matrix(
                    leaf.module, (leaf.ops.out_features, leaf.ops.in_features), leaf.ops.in_features,
                    (feedback or {}).get(leaf.module), gen, problem)
        self.seed = seed

    def _forward_and_error(self, theta):
        """Parameters, the forward trace and the output error ∂L/∂y (B, C) at one θ."""
        params = self.problem.unflatten(theta)
        trace = self.tree.forward(params, self.problem.inputs)
        error = torch.func.grad(lambda out: self.problem.loss_fn(out, self.problem.targets))(trace.output)
        return params, trace, error.reshape(error.shape[0], -1)

    def pseudo_gradient(self, theta: torch.Tensor) -> torch.Tensor:
        """ĝ(θ): the update direction's negative (equal to ∇L when the feedback equals the weights)."""
        from flows.metrics._base import batched
        from flows.modules import LinearOps

        def one(th):
            params, trace, lam = self._forward_and_error(th)
            grads = []
            for leaf in reversed(self.leaves):
                x, p = trace.values[leaf.inputs[0]], leaf.local(params)
                if isinstance(leaf.ops, LinearOps):
                    grads.append(leaf.ops.vjp_param(p, [x], lam))
                    lam = lam @ self.feedback[leaf.module]
                else:
                    lam = leaf.ops.pull(p, [x], lam[:, None], [True])[0][0][:, 0]
            return torch.cat(grads[::-1])

        return batched(one, theta)

    def __call__(self, t, theta):
        return -self.pseudo_gradient(theta)

    def describe(self) -> dict:
        return {"name": "FeedbackAlignment", "seed": self.seed}


class DirectFeedbackAlignment(FeedbackAlignment):
    """Direct feedback alignment (Nøkland 2016): the output error e = ∂L/∂y reaches every hidden Linear layer a
    through its own fixed random matrix D_a (C × width_a): δ_a = (e D_a) ⊙ σ'(z_a), ĝ_a = δ_a x_{a−1}ᵀ.

    For a network with one hidden layer, D = W_out reproduces backprop exactly.
    """

    def __init__(self, problem: Problem, seed: int = 0, feedback: dict | None = None):
        from flows.modules import ActivationOps, LinearOps

        self.problem = problem
        self.tree, self.leaves = _chain_leaves(problem, "DirectFeedbackAlignment")
        linear = [leaf for leaf in self.leaves if isinstance(leaf.ops, LinearOps)]
        outputs = linear[-1].ops.out_features
        gen = torch.Generator().manual_seed(seed)
        self.feedback = {}
        for leaf in linear[:-1]:
            after = self.leaves[self.leaves.index(leaf) + 1]
            if not isinstance(after.ops, ActivationOps):
                raise ValueError(f"DirectFeedbackAlignment needs an activation after hidden layer {leaf.module!r}")
            self.feedback[leaf.module] = _feedback_matrix(leaf.module, (outputs, leaf.ops.out_features), outputs,
                                                          (feedback or {}).get(leaf.module), gen, problem)
        self.seed = seed

    def pseudo_gradient(self, theta: torch.Tensor) -> torch.Tensor:
        from flows.metrics._base import batched
        from flows.modules import LinearOps

        def one(th):
            params, trace, error = self._forward_and_error(th)
            grads = []
            for i, leaf in enumerate(self.leaves):
                if not isinstance(leaf.ops, LinearOps):
                    continue
                x, p = trace.values[leaf.inputs[0]], leaf.local(params)
                if leaf.module in self.feedback:
                    activation = self.leaves[i + 1]
                    z = trace.values[activation.inputs[0]]  # the activation's input is this layer's output
                    delta = (error @ self.feedback[leaf.module]) * activation.ops.derivative(z)
                else:
                    delta = error
                grads.append(leaf.ops.vjp_param(p, [x], delta))
            return torch.cat(grads)

        return batched(one, theta)

    def describe(self) -> dict:
        return {"name": "DirectFeedbackAlignment", "seed": self.seed}


class LinearSystem:
    """ẋ = A x for a stable A, with the Lyapunov loss L(x) = xᵀPx, AᵀP + PA = −Q (MATH.md §4 worked case).

    Along the flow dL/dt = −xᵀQx < 0, so the rule is effective with yᵀv = xᵀQx, and natural gradient descent
    for some metric; a constant metric exists only when −2PA⁻¹ is symmetric. ``problem`` is the Lyapunov loss.
    """

    def __init__(self, A, Q=None, x0=None):
        import scipy.linalg

        from flows.data import function_problem

        self.A = torch.as_tensor(A, dtype=torch.float64)
        n = self.A.shape[0]
        self.Q = torch.eye(n, dtype=torch.float64) if Q is None else torch.as_tensor(Q, dtype=torch.float64)
        eig = torch.linalg.eigvals(self.A).real.max()
        if not eig < 0:
            raise ValueError(f"A must be stable (all eigenvalues in the left half-plane); max Re λ = {float(eig):.3g}")
        self.P = torch.as_tensor(scipy.linalg.solve_continuous_lyapunov(self.A.T.numpy(), -self.Q.numpy()))
        P = self.P

        def lyapunov(x):
            return x @ P.to(x) @ x

        self.problem = function_problem(lyapunov, torch.ones(n) if x0 is None else x0)

    def __call__(self, t, x):
        return x @ self.A.to(x).T

    def describe(self) -> dict:
        return {"name": "LinearSystem", "n": self.A.shape[0]}


class HeavyBall:
    """Heavy-ball momentum θ̈ + γθ̇ = −G⁻¹∇L as a first-order system on z = (θ, v) ∈ R^{2N}:

        θ̇ = v,    v̇ = −γ v − G(θ)⁻¹∇L(θ).

    The state is (θ, v) concatenated; ``theta_of(z)`` reads θ (simulate records the loss from it) and
    ``initial_state`` builds z₀. Effective only with an energy-type loss on z (MATH.md §4): see
    :meth:`energy_problem`. Cost per evaluation: one gradient and one metric solve.
    """

    def __init__(self, problem: Problem, friction: float = 1.0, metric: Metric | None = None):
        if not float(friction) >= 0:
            raise ValueError(f"friction must be non-negative, got {friction}")
        self.problem = problem
        self.friction = float(friction)
        self.metric = Euclidean() if metric is None else metric
        self.n = problem.num_params
        self.state_length = 2 * self.n

    def theta_of(self, state: torch.Tensor) -> torch.Tensor:
        return state[..., :self.n]

    def velocity_of(self, state: torch.Tensor) -> torch.Tensor:
        return state[..., self.n:]

    def initial_state(self, theta0: torch.Tensor | None = None, velocity=None) -> torch.Tensor:
        theta0 = self.problem.theta0 if theta0 is None else theta0
        velocity = torch.zeros_like(theta0) if velocity is None else torch.as_tensor(velocity).to(theta0)
        return torch.cat([theta0, velocity], dim=-1)

    def __call__(self, t, state):
        theta, v = self.theta_of(state), self.velocity_of(state)
        force = self.metric.solve(theta, self.problem.grad(theta))
        return torch.cat([v, -self.friction * v - force], dim=-1)

    def energy_problem(self, cross: float = 0.0) -> Problem:
        """The energy E(z) = ½‖v‖² + L(θ) + ε vᵀ∇L(θ) on the 2N-dimensional state (ε = ``cross``).

        Along the flow dE/dt = −γ‖v‖² + ε(vᵀHv − γvᵀ∇L − ‖∇L‖²): ≤ 0 for ε = 0 (zero whenever v = 0) and strictly
        negative away from critical points for small ε > 0, which makes the momentum rule natural gradient
        descent on E.
        """
        from flows.data import function_problem

        problem, n = self.problem, self.n

        def energy(z):
            theta, v = z[:n], z[n:]
            return 0.5 * (v * v).sum() + problem.loss(theta) + cross * (v * problem.grad(theta)).sum()

        return function_problem(energy, self.initial_state(), name="heavy_ball_energy")

    def describe(self) -> dict:
        return {"name": "HeavyBall", "friction": self.friction, "metric": self.metric.describe()}


class AdamFlow:
    """A continuous-time Adam: state z = (θ, m, s) ∈ R^{3N},

        ṁ = a (∇L − m),    ṡ = b (∇L² − s),    θ̇ = −m / (√s + ε),

    the ODE whose Euler steps of size 1 are Adam's moment updates with β₁ = 1 − a, β₂ = 1 − b (without bias
    correction; ``initial_state`` starts the moments at ∇L(θ₀) and ∇L(θ₀)², the bias-corrected values).
    Cost per evaluation: one gradient.
    """

    def __init__(self, problem: Problem, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
        for name, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0 <= beta < 1:
                raise ValueError(f"{name} must lie in [0, 1), got {beta}")
        self.problem = problem
        self.rates = (1.0 - beta1, 1.0 - beta2)
        self.eps = float(eps)
        self.n = problem.num_params
        self.state_length = 3 * self.n

    def theta_of(self, state):
        return state[..., :self.n]

    def initial_state(self, theta0: torch.Tensor | None = None) -> torch.Tensor:
        theta0 = self.problem.theta0 if theta0 is None else theta0
        g = self.problem.grad(theta0)
        return torch.cat([theta0, g, g * g], dim=-1)

    def __call__(self, t, state):
        n = self.n
        theta, m, s = state[..., :n], state[..., n:2 * n], state[..., 2 * n:]
        g = self.problem.grad(theta)
        a, b = self.rates
        return torch.cat([-m / (s.clamp_min(0).sqrt() + self.eps), a * (g - m), b * (g * g - s)], dim=-1)

    def describe(self) -> dict:
        return {"name": "AdamFlow", "beta1": 1 - self.rates[0], "beta2": 1 - self.rates[1], "eps": self.eps}


class ModifiedGradientFlow:
    """The modified flow of gradient descent with step η (implicit gradient regularisation, Barrett & Dherin 2021;
    MATH.md §6):

        θ̇ = −∇L̃(θ),   L̃ = L + (η/4)‖∇L‖²,   ∇L̃ = ∇L + (η/2) H∇L.

    Gradient descent θ_{k+1} = θ_k − η∇L(θ_k), read at t_k = kη, stays within O(η²) of it on a fixed horizon (of the
    plain gradient flow only within O(η)). This is backward error analysis of the map θ ↦ θ + ηf(θ): the field
    f̃ = f − (η/2) f′f matches the map's Taylor expansion through η².

    With a ``metric`` G the map is θ ← θ − ηF(θ), F = G⁻¹∇L, and the same analysis gives f̃ = −(F + (η/2) F′F):

    * ``moving=False`` (default) takes F′ = G⁻¹H, i.e. f̃ = −(G⁻¹g + (η/2) G⁻¹H G⁻¹g), g = ∇L. This is the exact
      second-order modified field when G is constant (Euclidean, Diagonal, Constant). For a metric that moves
      with θ it omits the term (η/2)(DG⁻¹(θ)[F]) g, so the O(η²) agreement is then not guaranteed.
    * ``moving=True`` differentiates the whole direction θ ↦ G(θ)⁻¹∇L(θ) in forward mode (a JVP through
      ``metric.solve``), the exact second-order field for any metric whose solve torch.func can differentiate.

    The Hessian–vector product is matrix-free: the gradient is taken with its autograd graph kept and H·(G⁻¹∇L) is
    one more backward pass through it (double backward), no N × N matrix. Cost per evaluation: about two gradients
    and two metric solves. With ``moving`` the direction is differentiated by ``torch.func.jvp`` (forward-over-
    reverse through the gradient and the solve: about four gradients).
    """

    def __init__(self, problem: Problem, lr: float, metric: Metric | None = None, *, moving: bool = False):
        import math

        if not isinstance(problem, Problem):
            raise TypeError(f"problem must be a flows.Problem, got {type(problem).__name__}")
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        self.problem = problem
        self.lr = float(lr)
        self.metric = Euclidean() if metric is None else metric
        self.moving = bool(moving)

    def direction(self, theta: torch.Tensor) -> torch.Tensor:
        """F(θ) = G(θ)⁻¹∇L(θ), the step direction of the discrete map (its negative is the plain flow)."""
        return self.metric.solve(theta, self.problem.grad(theta))

    def __call__(self, t, theta: torch.Tensor) -> torch.Tensor:
        from torch.func import jvp

        theta = theta.detach()
        if self.moving:
            u = self.direction(theta)
            correction = jvp(self.direction, (theta,), (u,))[1]
            return -(u + 0.5 * self.lr * correction)
        # ∇L with its graph kept, then H·(G⁻¹∇L) by one more backward pass through it (double backward: about 2.5×
        # cheaper than forward-over-reverse, which would recompute the gradient); an ensemble's losses are summed,
        # which leaves each member's derivatives its own
        with torch.enable_grad():
            th = theta.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(self.problem.loss(th).sum(), th, create_graph=True)
            u = self.metric.solve(theta, g.detach())
            hu = torch.autograd.grad(g, th, u)[0] if g.requires_grad else torch.zeros_like(u)
        return -(u + 0.5 * self.lr * self.metric.solve(theta, hu.detach()))

    def describe(self) -> dict:
        return {"name": "ModifiedGradientFlow", "lr": self.lr, "metric": self.metric.describe(),
                "moving": self.moving}

    def __repr__(self) -> str:
        return f"ModifiedGradientFlow({self.problem!r}, lr={self.lr}, metric={self.metric!r})"
