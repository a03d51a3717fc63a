"""Learning rules as vector fields f(t, θ) → dθ/dt, ready for :func:`flows.simulate`.

Any callable ``f(t, θ)`` returning a tensor shaped like θ is a valid field; the classes here also carry the
``problem`` they act on, so that simulate can record the loss along the way.
"""

from __future__ import annotations

import torch

from flows.metrics import Euclidean, Metric
from flows.problem import Problem, output_gradient


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

    def jacobian_products(self, t: torch.Tensor, theta: torch.Tensor, vectors: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """(f(t, θ), J V) for one θ (N,) and k vectors V (N, k), J = ∂f/∂θ, under a Euclidean metric G = s·I:
        f = −∇L/s and J V = −∇²L V/s, both from :meth:`flows.Problem.hessian_products` (the gradient once, its graph
        kept, and the k products by one batched backward pass through it). Cost: about one gradient plus k backward
        passes run as one batched pass. Other metrics raise ``ValueError``: their J involves G(θ)⁻¹ and its
        derivative, which Hessian products alone do not give."""
        if not self.symmetric_jacobian:
            raise ValueError(f"jacobian_products needs a Euclidean metric (J = −∇²L/s); this flow's metric is "
                             f"{type(self.metric).__name__}: use forward-mode products (torch.func.jvp) of the field")
        g, products = self.problem.hessian_products(theta, vectors)
        return -g / self.metric.scale, -products / self.metric.scale

    def describe(self) -> dict:
        return {"name": "GradientFlow", "metric": self.metric.describe()}

    def __repr__(self) -> str:
        return f"GradientFlow({self.problem!r}, {self.metric!r})"


def _feedback_graph(problem, rule: str, feedback: dict | None):
    """The module graph of the problem's model and its layers that take feedback: every call of a Linear or
    structured Conv1d/Conv2d module. A module that owns parameters but is neither (LayerNorm, Embedding, attention,
    a Linear called with keyword arguments) is refused by name; a parameter read directly in ``forward`` is allowed
    (its update is its pseudo-costate). Feedback given for a module that takes none is refused too."""
    from flows.modules import ConvOps, LinearOps, read

    graph = read(problem.model)
    layers = []
    for node in graph.module_nodes:
        if node.kind == "parameter":
            continue
        if not isinstance(node.ops, LinearOps | ConvOps):
            module = graph.model.get_submodule(node.module)
            raise ValueError(f"{rule} has feedback for Linear and Conv1d/Conv2d layers (called on one input, zero "
                             f"padding, one group) only; module {node.module!r} ({type(module).__name__}) owns "
                             "parameters but is neither")
        layers.append(node)
    unknown = sorted(set(feedback or {}) - {node.module for node in layers})
    if unknown:
        raise ValueError(f"{rule}: feedback given for {unknown}, which are not layers that take feedback; those are "
                         f"{sorted({node.module for node in layers})}")
    return graph, layers


def _feedback_matrix(name, shape, fan_in, given, generator, problem):
    """The given feedback tensor for module ``name``, or U(−1/√fan_in, 1/√fan_in) — the bound of torch's own
    initialisation of Linear and Conv weights (kaiming-uniform with a = √5), so random feedback matches the forward
    layer's scale."""
    shape = tuple(shape)
    if given is None:
        draw = torch.rand(shape, generator=generator, dtype=problem.dtype) * 2 - 1
        return (draw / fan_in**0.5).to(problem.device)
    matrix = torch.as_tensor(given, dtype=problem.dtype, device=problem.device)
    if tuple(matrix.shape) != shape:
        raise ValueError(f"feedback for {name!r} must have shape {shape}, got {tuple(matrix.shape)}")
    return matrix


def _weight_name(node) -> str:
    """The full θ name of a Linear/Conv node's weight."""
    return node.param_names[node.ops.local_names.index("weight")]


def _gather(problem, grads: dict, like: torch.Tensor) -> torch.Tensor:
    """θ-ordered vector from per-parameter pieces (zeros for parameters no update reached)."""
    params = problem.unflatten(like)
    return problem.flatten({n: grads[n].reshape(q.shape) if n in grads else torch.zeros_like(q)
                            for n, q in params.items()})


class FeedbackAlignment:
    """Feedback alignment (Lillicrap et al. 2016) on any module graph: backprop with each layer's transpose
    Jacobian with respect to its input computed from a fixed random feedback tensor F_a in place of its weight W_a,
    θ̇ = −ĝ(θ).

    The pseudo-costate is swept backward over the model's graph (:func:`flows.modules.backward`), summed over
    consumers, with λ_x = F_aᵀλ_a at every Linear layer (λ_a F_a) and convolution (the transposed convolution with
    kernel F_a) in place of W_aᵀλ_a; activations, additions (residual connections), concatenations and reshapes keep
    their exact transposes. Each layer updates from its true input and its pseudo-costate, ĝ_a = B_aᵀλ_a (Linear:
    λ_a x_{a−1}ᵀ; convolution: λ_a against the unfolded input patches); a parameter read directly in ``forward``
    gets its pseudo-costate. F_a has W_a's shape, drawn with ``seed`` (in graph order) uniformly at the bound of
    torch's own initialisation of the layer, 1/√fan_in (fan_in = in_features, or C_in·kernel size), or is given
    in ``feedback`` by module name. With F_a = W_a it is exactly backprop. A module that owns parameters but is not
    a Linear or convolution layer is refused by name. Cost: one forward and one backward sweep.
    """

    rule = "FeedbackAlignment"

    def __init__(self, problem: Problem, seed: int = 0, feedback: dict | None = None):
        self.problem = problem
        self.graph, self.layers = _feedback_graph(problem, self.rule, feedback)
        gen = torch.Generator().manual_seed(seed)
        weights = problem.unflatten(problem.theta0)
        self.feedback = {}
        for node in self.layers:
            if node.module in self.feedback:  # a module called twice feeds back through one tensor
                continue
            shape = weights[_weight_name(node)].shape
            self.feedback[node.module] = _feedback_matrix(node.module, shape, shape[1:].numel(),
                                                          (feedback or {}).get(node.module), gen, problem)
        self.seed = seed

    def _forward_and_error(self, theta):
        """Parameters, the forward trace and the output error ∂L/∂y at one θ."""
        params = self.problem.unflatten(theta)
        trace = self.graph.forward(params, self.problem.inputs)
        error = output_gradient(self.problem.loss_fn, trace.output, self.problem.targets)
        return params, trace, error

    def pseudo_gradient(self, theta: torch.Tensor) -> torch.Tensor:
        """ĝ(θ): the update direction's negative (equal to ∇L when the feedback equals the weights)."""
        from flows.metrics._base import batched
        from flows.modules import Trace, backward, node_gradient

        def one(th):
            params, trace, error = self._forward_and_error(th)
            swapped = dict(params)
            for node in self.layers:  # the backward sweep reads each layer's weight from here: F_a, not W_a
                swapped[_weight_name(node)] = self.feedback[node.module]
            grads: dict = {}

            def visit(node, ins, p, rows, k):
                # Linear/Conv parameter products read only the weight's shape, never its values
                flat = node_gradient(node, ins, p, rows, k)
                offset = 0
                for name in node.param_names:
                    size = params[name].numel()
                    piece = flat[offset:offset + size]
                    grads[name] = piece if name not in grads else grads[name] + piece
                    offset += size

            backward(self.graph, Trace(self.graph, swapped, trace.values), error[:, None], visit)
            return _gather(self.problem, grads, th)

        return batched(one, theta)

    def __call__(self, t, theta):
        return -self.pseudo_gradient(theta)

    def describe(self) -> dict:
        return {"name": self.rule, "seed": self.seed, "layers": sorted(self.feedback)}


class DirectFeedbackAlignment(FeedbackAlignment):
    """Direct feedback alignment (Nøkland 2016) on any module graph: the output error e = ∂L/∂y (B, C) reaches the
    output z_a of every layer a (Linear or convolution) through its own fixed random matrix D_a (C × |z_a|, the
    layer's output per sample flattened):

        δ_a = (e D_a) ⊙ σ'(z_a)   if the layer's only consumer is an elementwise activation σ,
        δ_a = e D_a               otherwise (its output enters a residual sum, a reshape, a pooling, …),
        δ_a = e                   for a layer whose output is the model's output,

    and the layer updates from its true input, ĝ_a = B_aᵀδ_a. D_a is drawn with ``seed`` (in graph order) from
    U(−1/√C, 1/√C) or given in ``feedback`` by module name. For a network with one hidden layer, D = W_out
    reproduces backprop exactly. A parameter read directly and a module called more than once are refused (no one
    layer output to project to), as are modules that own parameters but are neither Linear nor convolutions.
    """

    rule = "DirectFeedbackAlignment"

    def __init__(self, problem: Problem, seed: int = 0, feedback: dict | None = None):
        from flows.modules import ActivationOps

        self.problem = problem
        self.graph, self.layers = _feedback_graph(problem, self.rule, feedback)
        for node in self.graph.module_nodes:
            if node.kind == "parameter":
                raise ValueError(f"{self.rule} projects the error to each layer's output; parameter "
                                 f"{node.param_names[0]!r} is read directly in forward and has no layer output")
        calls = [node.module for node in self.layers]
        twice = sorted({m for m in calls if calls.count(m) > 1})
        if twice:
            raise ValueError(f"{self.rule} projects the error to each layer's output; module(s) {twice} are called "
                             "more than once")
        trace = self.graph.forward(problem.unflatten(problem.theta0), problem.inputs)
        outputs = trace.output[0].numel()
        consumers: dict = {}
        for node in self.graph.nodes:
            for i in node.inputs:
                consumers.setdefault(i, []).append(node)
        gen = torch.Generator().manual_seed(seed)
        self.feedback, self.activation = {}, {}
        for node in self.layers:
            after = consumers.get(node.name, [])
            if any(c.kind == "output" for c in after):
                continue  # the output layer sees the true error
            width = trace.values[node.name][0].numel()
            self.feedback[node.module] = _feedback_matrix(node.module, (outputs, width), outputs,
                                                          (feedback or {}).get(node.module), gen, problem)
            if len(after) == 1 and isinstance(after[0].ops, ActivationOps):
                self.activation[node.name] = after[0].ops
        unused = sorted(set(feedback or {}) - set(self.feedback))
        if unused:
            raise ValueError(f"{self.rule}: feedback given for {unused}, whose output is the model's output: that "
                             "layer sees the true error and takes no feedback")
        self.seed = seed

    def pseudo_gradient(self, theta: torch.Tensor) -> torch.Tensor:
        from flows.metrics._base import batched

        def one(th):
            params, trace, error = self._forward_and_error(th)
            flat_error = error.reshape(error.shape[0], -1)
            grads: dict = {}
            for node in self.layers:
                ins, p = trace.inputs_of(node), node.local(params)
                if node.module in self.feedback:
                    z = trace.values[node.name]
                    delta = (flat_error @ self.feedback[node.module]).reshape(z.shape)
                    if node.name in self.activation:
                        delta = delta * self.activation[node.name].derivative(z)
                else:
                    delta = error
                flat = node.ops.vjp_param(p, ins, delta)
                offset = 0
                for name in node.param_names:
                    size = params[name].numel()
                    grads[name] = flat[offset:offset + size]
                    offset += size
            return _gather(self.problem, grads, th)

        return batched(one, theta)


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
