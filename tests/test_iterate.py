"""flows.iterate and the updates of flows.discrete, against loops written here from the papers' formulas."""

import math

import pytest
import torch
from torch import nn

import flows
from flows.discrete import GD, SGD, Adam, Momentum, NaturalGradientDescent, minibatches


def small_problem(samples=24, eval_data=False, seed=0):
    """A 3-5-2 tanh MLP with squared error on random data: small, nonlinear, N = 32."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(samples, 2, generator=gen, dtype=torch.float64)
    extra = {"test": (x[:5] + 0.1, y[:5])} if eval_data else None
    return flows.Problem(flows.data.mlp([3, 5, 2], seed=seed), "mse", (x, y), eval_data=extra)


def hand_permutations(n, b, seed, steps):
    """The documented sampling, written out: one permutation per epoch from one seeded generator, cut in order."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < steps:
        order = torch.randperm(n, generator=gen)
        out.extend(order[i:i + b] for i in range(0, n, b))
    return out[:steps]


def test_gd_equals_a_hand_loop_and_records_the_discrete_trajectory():
    problem = small_problem(eval_data=True)
    lr, steps = 0.3, 25
    traj = flows.iterate(GD(problem), problem.theta0, steps, lr=lr, progress=False)
    theta, states = problem.theta0.clone(), [problem.theta0.clone()]
    for _ in range(steps):
        theta = theta - lr * problem.grad(theta)
        states.append(theta)
    assert torch.allclose(traj.theta, torch.stack(states), rtol=0, atol=1e-12)
    assert torch.allclose(traj.t, lr * torch.arange(steps + 1, dtype=torch.float64), rtol=0, atol=1e-15)
    losses = torch.stack([problem.loss(s) for s in states])
    assert torch.allclose(traj.loss, losses, rtol=1e-12, atol=0)
    norms = torch.stack([problem.grad(s).norm() for s in states])
    assert torch.allclose(traj.grad_norm, norms, rtol=1e-12, atol=0)
    tests = torch.stack([problem.evaluate(s)["test_loss"] for s in states])
    assert torch.allclose(traj.metrics["test_loss"], tests, rtol=1e-12, atol=0)
    meta = traj.metadata
    assert meta["dynamics"] == "discrete" and meta["rule"] == {"name": "GD"}
    assert (meta["lr"], meta["batch_size"], meta["seed"], meta["steps"]) == (lr, None, 0, steps)
    assert traj.stats["nfe"] == steps and traj.stats["nfe_at_output"] == list(range(steps + 1))
    assert traj.field is not None and traj.problem is problem


def test_minibatch_sgd_equals_a_hand_loop_over_seeded_epoch_permutations():
    problem = small_problem(samples=22)
    lr, steps, b, seed = 0.2, 17, 5, 3  # 22 = 4·5 + 2: each epoch ends in a batch of 2
    traj = flows.iterate(SGD(problem), problem.theta0, steps, lr=lr, batch_size=b, seed=seed, progress=False)
    theta = problem.theta0.clone()
    for idx in hand_permutations(22, b, seed, steps):
        theta = theta - lr * problem.grad(theta, idx)
    assert torch.allclose(traj.final, theta, rtol=0, atol=1e-12)
    assert traj.metadata["batch_size"] == b and traj.metadata["seed"] == seed
    assert traj.stats["epochs"] == pytest.approx(steps / 5)


@pytest.mark.parametrize("n, b", [(12, 4), (12, 5), (7, 7), (9, 1)])
def test_every_epoch_visits_every_sample_exactly_once(n, b):
    # L_B(w) = mean_{i∈B} w_i (one-hot inputs through a bias-free linear map): a GD step with lr = 1 lowers w_i by
    # 1/|B| exactly for the samples i of the step's batch, so the changed coordinates spell out the batch.
    model = nn.Linear(n, 1, bias=False, dtype=torch.float64)
    nn.init.zeros_(model.weight)
    problem = flows.Problem(model, lambda out, target: out.mean(), (torch.eye(n), torch.zeros(n, 1)))
    per_epoch = math.ceil(n / b)
    epochs = 3
    traj = flows.iterate(GD(problem), problem.theta0, epochs * per_epoch, lr=1.0, batch_size=b, seed=1,
                         progress=False, record=False)
    steps = traj.theta[1:] - traj.theta[:-1]
    for e in range(epochs):
        seen = torch.zeros(n)
        for k in range(e * per_epoch, (e + 1) * per_epoch):
            changed = steps[k] != 0
            size = int(changed.sum())
            assert size == (b if k % per_epoch < per_epoch - 1 or n % b == 0 else n % b)
            assert torch.allclose(steps[k][changed], torch.full((size,), -1.0 / size, dtype=torch.float64))
            seen += changed
        assert bool((seen == 1).all()), f"epoch {e} visited samples {seen.tolist()} times"


def test_the_seed_reproduces_a_run_and_different_seeds_differ():
    problem = small_problem()
    run = [flows.iterate(GD(problem), problem.theta0, 12, lr=0.1, batch_size=4, seed=s, progress=False, record=False)
           for s in (7, 7, 8)]
    assert torch.equal(run[0].theta, run[1].theta)
    assert not torch.allclose(run[0].final, run[2].final, rtol=0, atol=1e-6)
    first = [next(iter(minibatches(24, 4, seed=s))) for s in (7, 8)]
    assert not torch.equal(first[0], first[1])


def test_momentum_equals_polyaks_heavy_ball_loop():
    problem = small_problem()
    lr, beta, steps = 0.1, 0.8, 20
    traj = flows.iterate(Momentum(problem, beta=beta), problem.theta0, steps, lr=lr, progress=False, record=False)
    # Polyak (1964): θ_{k+1} = θ_k − η∇L(θ_k) + β(θ_k − θ_{k−1}), θ_{−1} = θ_0
    previous, theta = problem.theta0.clone(), problem.theta0.clone()
    for _ in range(steps):
        previous, theta = theta, theta - lr * problem.grad(theta) + beta * (theta - previous)
    assert torch.allclose(traj.final, theta, rtol=0, atol=1e-12)
    assert traj.metadata["rule"] == {"name": "Momentum", "beta": beta}


def test_adam_equals_kingma_and_ba_algorithm_1():
    problem = small_problem()
    lr, b1, b2, eps, steps = 0.05, 0.85, 0.99, 1e-6, 15
    traj = flows.iterate(Adam(problem, b1, b2, eps), problem.theta0, steps, lr=lr, batch_size=8, seed=2,
                         progress=False, record=False)
    theta = problem.theta0.clone()
    m = torch.zeros_like(theta)
    v = torch.zeros_like(theta)
    for t, idx in enumerate(hand_permutations(24, 8, 2, steps), start=1):
        g = problem.grad(theta, idx)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        theta = theta - lr * m_hat / (torch.sqrt(v_hat) + eps)
    assert torch.allclose(traj.final, theta, rtol=0, atol=1e-12)


def test_natural_gradient_descent_euclidean_is_gd_and_constant_metric_solves():
    problem = small_problem()
    gd = flows.iterate(GD(problem), problem.theta0, 10, lr=0.2, progress=False, record=False)
    ngd = flows.iterate(NaturalGradientDescent(problem, flows.metrics.Euclidean()), problem.theta0, 10, lr=0.2,
                        progress=False, record=False)
    assert torch.allclose(ngd.theta, gd.theta, rtol=0, atol=1e-14)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(problem.num_params, problem.num_params, generator=gen, dtype=torch.float64)
    M = a @ a.T / problem.num_params + torch.eye(problem.num_params, dtype=torch.float64)
    traj = flows.iterate(NaturalGradientDescent(problem, flows.metrics.Constant(M)), problem.theta0, 10, lr=0.2,
                         progress=False, record=False)
    theta = problem.theta0.clone()
    for _ in range(10):
        theta = theta - 0.2 * torch.linalg.solve(M, problem.grad(theta))
    assert torch.allclose(traj.final, theta, rtol=0, atol=1e-12)
    assert traj.metadata["metric"]["name"] == "Constant"


def test_an_ensemble_moves_each_member_as_alone():
    problem = small_problem()
    starts = torch.stack([problem.theta0, 0.5 * problem.theta0])
    both = flows.iterate(GD(problem), starts, 8, lr=0.2, batch_size=6, seed=4, progress=False)
    for i in range(2):
        alone = flows.iterate(GD(problem), starts[i], 8, lr=0.2, batch_size=6, seed=4, progress=False)
        assert torch.allclose(both.theta[:, i], alone.theta, rtol=0, atol=1e-12)
        assert torch.allclose(both.loss[:, i], alone.loss, rtol=1e-12, atol=0)


def test_record_every_keeps_multiples_and_the_last_step():
    problem = small_problem()
    traj = flows.iterate(GD(problem), problem.theta0, 10, lr=0.5, record_every=4, progress=False)
    assert torch.allclose(traj.t, torch.tensor([0.0, 2.0, 4.0, 5.0], dtype=torch.float64))
    every = flows.iterate(GD(problem), problem.theta0, 10, lr=0.5, progress=False)
    assert torch.allclose(traj.theta, every.theta[[0, 4, 8, 10]], rtol=0, atol=1e-14)
    assert flows.iterate(GD(problem), problem.theta0, 0, lr=0.5, progress=False).theta.shape == (1, 32)


def quadratic(eigenvalues, seed=0):
    """L = ½θᵀHθ with H = Q diag(eigenvalues) Qᵀ, Q a seeded random rotation; θ₀ with weight on every direction."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=gen, dtype=torch.float64))
    H = q @ torch.diag(torch.as_tensor(eigenvalues, dtype=torch.float64)) @ q.T
    return flows.data.quadratic(H, torch.ones(len(eigenvalues))), H


def test_gd_on_a_quadratic_diverges_exactly_above_two_over_the_largest_eigenvalue():
    problem, H = quadratic([0.5, 1.0, 4.0])
    edge = 2.0 / float(torch.linalg.eigvalsh(H)[-1])
    start = problem.theta0.norm()
    # the top mode's factor per step is |1 − ηλ_max| = 1 ∓ 0.02 at η = (1 ∓ 0.01)·2/λ_max: over 1500 steps it
    # shrinks or grows by e^{∓30}, every other mode decays
    below = flows.iterate(GD(problem), problem.theta0, 1500, lr=0.99 * edge, progress=False, record=False)
    above = flows.iterate(GD(problem), problem.theta0, 1500, lr=1.01 * edge, progress=False, record=False)
    assert float(below.final.norm()) < 1e-8 * start
    assert float(above.final.norm()) > 1e8 * start


def test_divergence_raises_with_the_partial_trajectory_up_to_the_last_finite_state():
    problem, H = quadratic([1.0, 4.0])
    lr = 3.0 / 4.0  # |1 − 3| = 2 per step on the top mode: overflow after ~1030 steps
    with pytest.raises(flows.FlowDivergedError) as info:
        flows.iterate(GD(problem), problem.theta0, 5000, lr=lr, record_every=100, progress=False)
    err = info.value
    partial = err.trajectory
    last_step = round(err.t / lr)
    assert 900 < last_step < 1200 and err.bad_time == pytest.approx((last_step + 1) * lr)
    assert bool(torch.isfinite(partial.theta).all()) and torch.equal(partial.theta[-1], err.theta)
    assert partial.t[-1].item() == pytest.approx(err.t)
    assert torch.allclose(partial.t[:-1], lr * 100 * torch.arange(len(partial) - 1, dtype=torch.float64))
    # the kept states are GD's: the one at step 100 is (I − ηH)^100 θ₀
    expected = torch.linalg.matrix_power(torch.eye(2, dtype=torch.float64) - lr * H, 100) @ problem.theta0
    assert torch.allclose(partial.theta[1], expected, rtol=1e-10, atol=0)
    assert partial.loss is not None and len(partial.loss) == len(partial)
    assert partial.metadata["dynamics"] == "discrete"


def test_iterate_approaches_the_gradient_flow_as_lr_shrinks():
    problem = small_problem()
    T = 1.0
    flow = flows.simulate(flows.rules.GradientFlow(problem), problem.theta0, torch.tensor([0.0, T]), rtol=1e-11,
                          atol=1e-11, progress=False, record=False).final
    errors = [float((flows.iterate(GD(problem), problem.theta0, round(T / lr), lr=lr, progress=False,
                                   record=False).final - flow).norm()) for lr in (0.1, 0.05, 0.025)]
    # first order: each halving of lr halves the error (to within the O(lr²) remainder)
    assert errors[0] > errors[1] > errors[2]
    for a, b in zip(errors, errors[1:]):
        assert 1.6 < a / b < 2.4


@pytest.mark.parametrize("kwargs, match", [
    ({"lr": 0.0}, r"lr must be a finite number > 0, got 0\.0"),
    ({"lr": -0.1}, r"got -0\.1"),
    ({"lr": float("nan")}, r"lr .* got nan"),
    ({"lr": float("inf")}, r"lr .* got inf"),
    ({"lr": 0.1, "steps": -1}, r"steps must be an integer ≥ 0, got -1"),
    ({"lr": 0.1, "steps": 2.5}, r"steps .* got 2\.5"),
    ({"lr": 0.1, "batch_size": 0}, r"batch_size must be an integer in 1…24 .* got 0"),
    ({"lr": 0.1, "batch_size": 25}, r"batch_size .* got 25"),
    ({"lr": 0.1, "record_every": 0}, r"record_every must be an integer ≥ 1, got 0"),
])
def test_bad_input_is_named(kwargs, match):
    problem = small_problem()
    steps = kwargs.pop("steps", 3)
    with pytest.raises(ValueError, match=match):
        flows.iterate(GD(problem), problem.theta0, steps, progress=False, **kwargs)


def test_bad_updates_and_hyperparameters_are_named():
    problem = small_problem()
    with pytest.raises(TypeError, match="init"):
        flows.iterate(object(), problem.theta0, 3, lr=0.1)
    with pytest.raises(ValueError, match=r"beta must be a number in \[0, 1\), got 1\.0"):
        Momentum(problem, beta=1.0)
    with pytest.raises(ValueError, match="beta2"):
        Adam(problem, beta2=-0.1)
    with pytest.raises(ValueError, match=r"shape \(N,\) or \(E, N\) with N = 32"):
        flows.iterate(GD(problem), torch.zeros(5, dtype=torch.float64), 3, lr=0.1)


def test_a_user_update_follows_the_protocol():
    class SignDescent:  # θ ← θ − η sign(g), written against the documented protocol only
        def __init__(self, problem):
            self.problem = problem

        def init(self, theta0):
            return 0

        def step(self, theta, count, gradient, lr):
            return theta - lr * torch.sign(gradient(theta)), count + 1

        def describe(self):
            return {"name": "SignDescent"}

    problem = small_problem()
    traj = flows.iterate(SignDescent(problem), problem.theta0, 4, lr=0.01, progress=False)
    theta = problem.theta0.clone()
    for _ in range(4):
        theta = theta - 0.01 * torch.sign(problem.grad(theta))
    assert torch.allclose(traj.final, theta, rtol=0, atol=1e-14)
    assert traj.metadata["rule"] == {"name": "SignDescent"}
