"""simulate_sde: SGD's stochastic modified equation (MATH.md §6) against independent oracles — the Ornstein–Uhlenbeck
stationary covariance (Lyapunov equation), Euler–Maruyama's exact moments, hand-written minibatch SGD, and dense
per-sample covariances — plus reproducibility, divergence and bad input."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torchsde
from torch import nn

import flows
from flows.metrics import Constant
from flows.sde import ConstantNoise, MinibatchNoise, SequentialBrownian, methods

H = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
SIGMA = torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=torch.float64)
M = torch.tensor([[1.5, 0.2], [0.2, 0.8]], dtype=torch.float64)


def regression_problem(n=48, d=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)[:d, None] + 0.7 * torch.randn(n, 1, generator=gen,
                                                                                                dtype=torch.float64)
    torch.manual_seed(seed)
    return flows.Problem(nn.Linear(d, 1, dtype=torch.float64), "mse", (x, y))


def sample_cov(x):
    """Sample covariance of rows x (P, N), and the standard error of each entry from the samples' fourth moments:
    Var(Ĉ_ij) ≈ Var[(x_i − x̄_i)(x_j − x̄_j)]/P (no Gaussian assumption)."""
    c = x - x.mean(0)
    prods = c[:, :, None] * c[:, None, :]
    return prods.mean(0), prods.std(0) / math.sqrt(x.shape[0])


# -- Ornstein–Uhlenbeck: stationary covariance = Lyapunov solution -------------------------------------------------
@pytest.mark.parametrize("with_metric", [False, True])
def test_quadratic_with_constant_noise_reaches_the_lyapunov_covariance(with_metric):
    """L = ½θᵀHθ, constant Σ: dθ = −Aθ dt + √(η/b) B dW with A = G⁻¹H, B = G⁻¹R (RRᵀ = Σ), an OU process whose
    stationary covariance C solves AC + CAᵀ = (η/b) BBᵀ (HC + CH = (η/b)Σ for G = I). C from scipy's Lyapunov solver.

    Tolerance: P = 3000 independent paths at t = 10 (the slowest mode has decayed by e^{−2·0.7·10} < 1e-6 from θ₀ = 0).
    Each entry of the sample covariance has standard error s_ij estimated from the samples (sample_cov); we allow
    5 s_ij, plus Euler–Maruyama's own O(h) bias |C_h − C|, C_h the exact stationary covariance of the discrete
    recursion θ ← (I − hA)θ + √(hη/b) B ξ (scipy's discrete Lyapunov solver): h = 0.02 makes it ~1%.
    """
    lr, b, paths, h = 0.1, 2, 3000, 0.02
    problem = flows.data.quadratic(H, torch.zeros(2))
    metric = Constant(M) if with_metric else None
    G = M if with_metric else torch.eye(2, dtype=torch.float64)
    A = torch.linalg.solve(G, H).numpy()
    R = torch.linalg.cholesky(SIGMA)
    B = torch.linalg.solve(G, R).numpy()
    Q = (lr / b) * B @ B.T
    C = scipy.linalg.solve_continuous_lyapunov(A, Q)  # solves AC + CAᵀ = Q
    step = np.eye(2) - h * A
    C_h = scipy.linalg.solve_discrete_lyapunov(step, h * Q)  # C_h = (I − hA) C_h (I − hA)ᵀ + hQ
    assert np.abs(C_h - C).max() < 0.03 * np.abs(C).max()  # the bias allowance is small

    traj = flows.simulate_sde(problem, torch.zeros(2), torch.tensor([0.0, 10.0]), lr=lr, batch_size=b, paths=paths,
                              metric=metric, noise=SIGMA, dt=h, seed=3, progress=False)
    assert traj.theta.shape == (2, paths, 2) and traj.is_ensemble
    final = traj.theta[-1]
    cov, err = sample_cov(final)
    assert ((cov - torch.tensor(C)).abs() <= 5 * err + torch.tensor(np.abs(C_h - C))).all(), (cov, C)
    # the mean is 0 to within 5 standard errors √(C_ii/P)
    assert (final.mean(0).abs() <= 5 * (torch.tensor(np.diag(C)) / paths).sqrt()).all()
    assert traj.metadata["noise_type"] == "additive" and traj.metadata["dynamics"] == "sde"


# -- Euler–Maruyama's weak order -----------------------------------------------------------------------------------
def test_euler_maruyama_weak_error_halves_with_the_step():
    """1-D OU dX = −aX dt + s dW (L = ½aθ², Σ = σ², s² = (η/b)σ²): E[X_T²] = x₀²e^{−2aT} + s²(1 − e^{−2aT})/(2a), and
    Euler–Maruyama with step h has exactly E[X_K²] = x₀²q^{2K} + s²h(1 − q^{2K})/(1 − q²), q = 1 − ah: a weak error
    of order 1.

    Common-noise design: all step sizes see ONE Brownian path per sample (torchsde's BrownianInterval with
    halfway_tree=True is determined by its seed alone, so coarse increments are sums of fine ones). The sampled
    differences Ê_h − Ê_{h/2} then carry the O(h) strong error only (additive noise), far below the bias difference
    measured, so their ratio at h and h/2 is ≈ 2^order = 2 although the sample mean Ê_h itself has a statistical
    error (≈ 0.03 at P = 4000) comparable to the biases. Each Ê_h is also checked against EM's exact E[X_K²].
    """
    a, x0, T, lr, b, sigma2, paths = 1.0, 2.0, 1.0, 0.5, 1, 1.0, 4000
    s2 = lr / b * sigma2
    problem = flows.data.quadratic(torch.tensor([[a]]), torch.tensor([x0]))
    exact = x0**2 * math.exp(-2 * a * T) + s2 * (1 - math.exp(-2 * a * T)) / (2 * a)
    estimates = []
    for h in (0.1, 0.05, 0.025):
        bm = torchsde.BrownianInterval(t0=0.0, t1=T, size=(paths, 1), dtype=torch.float64, entropy=11,
                                       halfway_tree=True, tol=1e-7)
        traj = flows.simulate_sde(problem, torch.tensor([x0]), torch.tensor([0.0, T]), lr=lr, batch_size=b,
                                  paths=paths, noise=torch.tensor([[sigma2]]), dt=h, bm=bm, progress=False,
                                  record=False)
        second = float((traj.theta[-1, :, 0] ** 2).mean())
        q, k = 1 - a * h, round(T / h)
        em = x0**2 * q ** (2 * k) + s2 * h * (1 - q ** (2 * k)) / (1 - q**2)
        # statistical error of the mean of X²: √(Var X²/P) with Var X² = 2v² + 4m²v for X ~ N(m, v)
        m2, v = x0**2 * q ** (2 * k), s2 * h * (1 - q ** (2 * k)) / (1 - q**2)
        assert abs(second - em) <= 5 * math.sqrt((2 * v**2 + 4 * m2 * v) / paths)
        estimates.append(second)
    d1, d2 = estimates[0] - estimates[1], estimates[1] - estimates[2]
    assert 1.6 <= d1 / d2 <= 2.5, (estimates, exact)
    assert abs(estimates[2] - exact) < abs(estimates[0] - exact)  # approaching E[X_T²]


# -- linear regression: SGD and the SDE ----------------------------------------------------------------------------
def test_linear_regression_sgd_moments_match_the_sde():
    """Minibatch SGD on least squares, b samples drawn WITH replacement per step (the SDE's assumption: the minibatch
    gradient then has covariance Σ(θ)/b; without replacement it would be Σ(θ)/b · (n − b)/(n − 1)), against the SDE.

    The SGD loop is written here from the closed-form gradient (checked against problem.grad(θ, idx) once), P runs
    side by side. For least squares ∇L is affine and Σ(θ) quadratic in θ, so Euler–Maruyama with dt = lr, whose
    increment −lr∇L + √(lr/b)·√lr·Dξ has the same conditional mean and covariance as SGD's, reproduces SGD's mean
    and covariance recursions exactly: the comparison is purely statistical (higher moments differ). Tolerance: two
    independent samples of P = 3000; the difference of means within 5 √(s²_SGD/P + s²_SDE/P), of covariance entries
    within 5 √(se²_SGD + se²_SDE) (se from the samples' fourth moments).
    """
    problem = regression_problem()
    n, lr, b, K, paths = problem.batch_size, 0.05, 4, 40, 3000
    x1 = torch.cat([problem.inputs, torch.ones(n, 1, dtype=torch.float64)], 1)  # θ = (W, bias) ↔ x̃ = (x, 1)
    y = problem.targets[:, 0]

    def minibatch_grad(theta, idx):  # (P, N), (P, b): ∇ of (1/b) Σ ½(x̃ᵢᵀθ − yᵢ)²
        xb = x1[idx]
        residual = (xb @ theta[:, :, None])[..., 0] - y[idx]
        return (residual[..., None] * xb).mean(1)

    theta0 = torch.tensor([0.5, 0.5, 0.5, 1.0], dtype=torch.float64)
    idx = torch.tensor([3, 7, 7, 20])
    assert torch.allclose(minibatch_grad(theta0[None], idx[None])[0], problem.grad(theta0, idx), atol=1e-13)

    gen = torch.Generator().manual_seed(5)
    theta = theta0.expand(paths, -1).clone()
    for _ in range(K):
        theta = theta - lr * minibatch_grad(theta, torch.randint(0, n, (paths, b), generator=gen))
    traj = flows.simulate_sde(problem, theta0, torch.tensor([0.0, K * lr]), lr=lr, batch_size=b, paths=paths,
                              seed=1, progress=False, record=False)
    sde = traj.theta[-1]
    mean_err = (theta.var(0) / paths + sde.var(0) / paths).sqrt()
    assert ((theta.mean(0) - sde.mean(0)).abs() <= 5 * mean_err).all()
    cov_sgd, se_sgd = sample_cov(theta)
    cov_sde, se_sde = sample_cov(sde)
    assert ((cov_sgd - cov_sde).abs() <= 5 * (se_sgd**2 + se_sde**2).sqrt()).all()
    # the spread is real: the covariance is many standard errors away from zero (the test could fail)
    assert (torch.diagonal(cov_sde) > 20 * torch.diagonal(se_sde)).all()
    assert traj.stats["increments"] == K


# -- the per-sample factor -----------------------------------------------------------------------------------------
def dense_sigma(problem, theta, rows=None):
    """Σ from a loop over samples: g_i by autograd on each sample's loss, Σ = (1/n) Σ (g_i − ḡ)(g_i − ḡ)ᵀ."""
    grads = []
    for i in range(problem.batch_size) if rows is None else rows:
        th = theta.detach().clone().requires_grad_()
        (g,) = torch.autograd.grad(problem.loss(th, [int(i)]), th)
        grads.append(g)
    g = torch.stack(grads)
    c = g - g.mean(0)
    return c.T @ c / len(grads), g


def quartic(out, target):
    """A loss of our own (mean of per-sample losses): ∂L/∂y through torch.func.grad, not a closed form."""
    return ((out - target) ** 4).sum() / out.shape[0]


@pytest.mark.parametrize("loss", ["mse", "cross_entropy", quartic])
def test_factor_reproduces_the_dense_covariance(loss):
    gen = torch.Generator().manual_seed(2)
    n = 12
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (n,), generator=gen) if loss == "cross_entropy" else torch.randn(n, 2, generator=gen,
                                                                                            dtype=torch.float64)
    problem = flows.Problem(flows.data.mlp([3, 4, 2]), loss, (x, y))
    theta = problem.theta0 + 0.3 * torch.randn(problem.num_params, generator=gen, dtype=torch.float64)
    sigma, g = dense_sigma(problem, theta)
    noise = MinibatchNoise(problem)
    assert torch.allclose(noise.covariance(theta), sigma, rtol=0, atol=1e-12)
    # the solver's matrix-free product D v (one weighted backward pass), column by column on the basis vectors,
    # gives D itself, and ∇L on the way
    eye = torch.eye(n, dtype=torch.float64)
    grad, cols = noise.gradient_and_product(theta.expand(n, -1), eye)
    assert torch.allclose(cols.T @ cols, sigma, rtol=0, atol=1e-12)
    assert torch.allclose(grad, g.mean(0).expand(n, -1), rtol=0, atol=1e-12)
    # the Euler step from one pass: −dt ∇L + s·D v against the per-sample gradients g_i directly
    v = torch.randn(2, n, generator=gen, dtype=torch.float64)
    dt, s = 0.1, 0.3
    expected = -dt * g.mean(0) + s * ((v - v.mean(1, keepdim=True)) @ g) / n ** 0.5
    torch.testing.assert_close(noise.euler_increment(theta.expand(2, -1), v, dt, s), expected, rtol=1e-12,
                               atol=1e-13)


def test_subsample_factor_is_the_rescaled_subset_covariance():
    """On a fixed subset S of m samples: D_S D_Sᵀ = (n − 1)/(n(m − 1)) Σ_{i∈S} (g_i − ḡ_S)(g_i − ḡ_S)ᵀ, an unbiased
    estimate of Σ; m = n would give Σ. The subset is seeded (same seed, same subset)."""
    problem = regression_problem(n=30)
    theta = problem.theta0 + 0.2
    noise = MinibatchNoise(problem, subsample=7, seed=4)
    assert noise.channels == 7 and len(set(noise.indices.tolist())) == 7
    assert torch.equal(noise.indices, MinibatchNoise(problem, subsample=7, seed=4).indices)
    sub, _ = dense_sigma(problem, theta, noise.indices.tolist())
    expected = sub * 7 / 6 * 29 / 30
    assert torch.allclose(noise.covariance(theta), expected, rtol=0, atol=1e-12)
    _, cols = noise.gradient_and_product(theta.expand(7, -1), torch.eye(7, dtype=torch.float64))
    assert torch.allclose(cols.T @ cols, expected, rtol=0, atol=1e-12)


# -- reproducibility, events, divergence ---------------------------------------------------------------------------
def test_same_seed_same_paths_and_different_seeds_differ(tmp_path):
    problem = regression_problem()
    t = torch.linspace(0, 0.5, 6, dtype=torch.float64)
    run = {seed: flows.simulate_sde(problem, problem.theta0, t, lr=0.05, batch_size=4, paths=3, seed=seed,
                                    progress=False) for seed in (0, 1)}
    again = flows.simulate_sde(problem, problem.theta0, t, lr=0.05, batch_size=4, paths=3, seed=0, progress=False)
    assert torch.equal(run[0].theta, again.theta)
    assert (run[0].theta[-1] - run[1].theta[-1]).abs().max() > 1e-3
    assert (run[0].theta[-1, 0] - run[0].theta[-1, 1]).abs().max() > 1e-3  # the paths are not copies
    traj = run[0]
    assert traj.loss.shape == (6, 3) and traj.grad_norm.shape == (6, 3)
    assert torch.allclose(traj.loss[:, 2], problem.loss(traj.theta[:, 2]))
    meta = traj.metadata
    assert (meta["lr"], meta["batch_size"], meta["paths"], meta["seed"], meta["method"]) == (0.05, 4, 3, 0, "euler")
    # one evaluation per step: 0.5 / dt (= lr) = 10 steps, none wasted on a ~1e-17 step when torchsde's running sum
    # 10 × 0.05 rounds to just below 0.5 (the Brownian motion's shape probe costs no evaluation either)
    assert traj.stats["nfe"] == traj.stats["increments"] == 10
    member = traj.member(1)
    assert member.theta.shape == (6, problem.num_params)
    loaded = flows.Trajectory.load(traj.save(tmp_path / "sde.npz"))
    assert torch.equal(loaded.theta, traj.theta) and loaded.metadata["dynamics"] == "sde"


def test_per_path_initial_states_and_a_field_with_its_metric():
    problem = flows.data.quadratic(H, torch.ones(2))
    starts = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    field = flows.rules.GradientFlow(problem, Constant(M))
    traj = flows.simulate_sde(field, starts, torch.tensor([0.0, 0.1]), lr=1e-12, batch_size=1, paths=2,
                              noise=SIGMA, dt=0.001, progress=False)
    assert torch.equal(traj.theta[0], starts)
    # with lr → 0 the noise vanishes and each path follows its flow θ(t) = exp(−M⁻¹H t) θ₀ (to Euler's O(h))
    flow = starts @ torch.linalg.matrix_exp(-torch.linalg.solve(M, H) * 0.1).T
    assert (traj.theta[-1] - flow).abs().max() < 1e-3
    assert traj.metadata["metric"]["name"] == "Constant"


def test_event_stops_at_the_first_output_time_past_it():
    problem = regression_problem()
    t = torch.linspace(0, 4, 41, dtype=torch.float64)
    level = 0.5 * float(problem.loss(problem.theta0))
    traj = flows.simulate_sde(problem, problem.theta0, t, lr=0.05, batch_size=4, paths=2,
                              event=flows.events.loss_below(level), progress=False)
    assert traj.stats["stopped_by_event"] and len(traj) < len(t)
    assert float(traj.loss[-1].min()) <= level < float(traj.loss[-2].min())


def test_divergence_keeps_the_partial_trajectory():
    problem = flows.data.function_problem(lambda th: (th**4).sum(), torch.tensor([2.0, 1.0]))
    t = torch.linspace(0, 5, 11, dtype=torch.float64)
    with pytest.raises(flows.FlowDivergedError) as info:
        flows.simulate_sde(problem, problem.theta0, t, lr=0.5, batch_size=1, paths=2, noise=0.01 * torch.eye(2),
                           progress=False)
    err = info.value
    partial = err.trajectory
    assert partial.theta.ndim == 3 and partial.theta.shape[1:] == (2, 2)
    assert torch.isfinite(partial.theta).all() and torch.isfinite(err.theta).all()
    assert err.t < err.bad_time <= 5.0
    assert torch.equal(partial.theta[0], problem.theta0.expand(2, -1))


# -- bad input -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"lr": 0.0}, "lr must be a finite number > 0, got 0.0"),
    ({"lr": -0.1}, "lr must be a finite number > 0, got -0.1"),
    ({"lr": float("nan")}, "lr must be"),
    ({"batch_size": 0}, "batch_size must be between 1 and 48.*got 0"),
    ({"batch_size": 49}, "batch_size must be between 1 and 48 .the training data has 48 samples., got 49"),
    ({"paths": 0}, "paths must be at least 1, got 0"),
    ({"method": "srk"}, r"method 'srk' .*torchsde offers \['euler'\]"),
    ({"method": "rk4"}, r"method 'rk4'"),
    ({"subsample": 1}, "subsample must be between 2 and 48"),
    ({"dt": -1.0}, "dt must be a finite number > 0, got -1.0"),
])
def test_bad_input_is_named(kwargs, match):
    problem = regression_problem()
    args = {"lr": 0.1, "batch_size": 4, "paths": 2, "progress": False} | kwargs
    with pytest.raises(ValueError, match=match):
        flows.simulate_sde(problem, problem.theta0, [0.0, 1.0], **args)


def test_bad_method_for_additive_noise_lists_the_valid_ones():
    problem = flows.data.quadratic(H, torch.ones(2))
    with pytest.raises(ValueError, match=r"'foo'.*additive.*\['euler', 'euler_heun', 'heun', 'log_ode'"):
        flows.simulate_sde(problem, torch.ones(2), [0.0, 1.0], lr=0.1, batch_size=1, noise=SIGMA, method="foo",
                           progress=False)
    assert methods("additive") == sorted(["euler", "milstein", "srk", "euler_heun", "heun", "log_ode", "midpoint",
                                          "reversible_heun"])


def test_noise_needs_per_sample_losses():
    x, y = torch.randn(10, 2, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)

    def summed(out, target):
        return ((out - target) ** 2).sum()

    problem = flows.Problem(nn.Linear(2, 1, dtype=torch.float64), summed, (x, y))
    with pytest.raises(ValueError, match="'summed' is not the mean of per-sample losses"):
        flows.simulate_sde(problem, problem.theta0, [0.0, 1.0], lr=0.1, batch_size=2, progress=False)


@pytest.mark.parametrize(("cov", "match"), [
    (torch.tensor([[1.0, 2.0], [2.0, 1.0]]), "positive semi-definite; its smallest eigenvalue is -1"),
    (torch.tensor([[1.0, 0.5], [0.0, 1.0]]), "symmetric"),
    (torch.eye(3), "length 3, the problem has 2 parameters"),
])
def test_bad_constant_noise_is_named(cov, match):
    problem = flows.data.quadratic(H, torch.ones(2))
    with pytest.raises(ValueError, match=match):
        flows.simulate_sde(problem, torch.ones(2), [0.0, 1.0], lr=0.1, batch_size=1, noise=cov, progress=False)


def test_constant_noise_factor_form():
    R = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    assert torch.allclose(ConstantNoise(factor=R).covariance(), R @ R.T)
    assert torch.allclose(ConstantNoise(R @ R.T).covariance(), R @ R.T, atol=1e-12)  # singular Σ is fine


def test_fused_euler_step_equals_drift_plus_noise_evaluated_apart():
    """For Euler with the minibatch noise, simulate_sde forms −dt∇L + √(η/b)·D dW from one weighted backward pass;
    a drift that is not recognised as −∇L (a plain field) takes the separate route (drift, then D dW). Same Brownian
    path, same states to rounding."""
    problem = regression_problem()

    class Plain:
        def __init__(self, problem):
            self.problem = problem

        def __call__(self, t, theta):
            return -self.problem.grad(theta)

    t = torch.linspace(0, 0.4, 3, dtype=torch.float64)
    kwargs = {"lr": 0.05, "batch_size": 4, "paths": 3, "seed": 2, "progress": False, "subsample": 20}
    fused = flows.simulate_sde(problem, problem.theta0, t, **kwargs)
    apart = flows.simulate_sde(Plain(problem), problem.theta0, t, **kwargs)
    assert torch.allclose(fused.theta, apart.theta, rtol=0, atol=1e-12)
    assert (fused.theta[-1] - fused.theta[0]).abs().max() > 1e-2


@pytest.mark.parametrize("method", methods("additive"))
def test_every_additive_method_follows_the_mean_flow(method):
    """With additive noise Itô and Stratonovich coincide, so every torchsde method integrates the same SDE; its mean
    solves the flow, E[θ(t)] = exp(−G⁻¹H t) θ₀. Tolerance: 5 standard errors of the mean of P = 400 paths, plus
    Euler's deterministic bias |(I − hA)^K θ₀ − e^{−AT} θ₀| (the largest of these methods', all of weak order ≥ 1)."""
    paths, h, T = 400, 0.05, 1.0
    problem = flows.data.quadratic(H, torch.ones(2))
    A = torch.linalg.solve(M, H)
    one = torch.ones(2, dtype=torch.float64)
    exact = torch.linalg.matrix_exp(-A * T) @ one
    euler = torch.linalg.matrix_power(torch.eye(2, dtype=torch.float64) - h * A, round(T / h)) @ one
    traj = flows.simulate_sde(problem, torch.ones(2), [0.0, T], lr=0.1, batch_size=1, paths=paths, noise=SIGMA,
                              metric=Constant(M), method=method, dt=h, seed=7, progress=False, record=False)
    final = traj.theta[-1]
    assert ((final.mean(0) - exact).abs() <= 5 * final.std(0) / math.sqrt(paths) + (euler - exact).abs()).all()
    assert traj.metadata["sde_type"] == ("ito" if method in ("euler", "milstein", "srk") else "stratonovich")


def test_sde_records_held_out_loss_and_accuracy_equal_to_direct_forward_passes():
    x, y = flows.data.digits(40, split="train")
    xt, yt = flows.data.digits(20, split="test")
    problem = flows.Problem(flows.data.mlp([64, 5, 10], seed=0), "cross_entropy", (x, y), eval_data={"test": (xt, yt)})
    t = torch.linspace(0.0, 0.6, 4, dtype=torch.float64)
    traj = flows.simulate_sde(problem, problem.theta0, t, lr=0.2, batch_size=8, paths=3, seed=2, progress=False)
    assert traj.metrics["test_loss"].shape == (4, 3) and traj.metrics["test_accuracy"].shape == (4, 3)
    model = problem.model
    for i in range(4):
        for p in range(3):
            torch.nn.utils.vector_to_parameters(traj.theta[i, p], model.parameters())
            with torch.no_grad():
                out = model(xt)
            assert abs(float(traj.metrics["test_loss"][i, p]) - float(nn.functional.cross_entropy(out, yt))) <= 1e-12
            assert float(traj.metrics["test_accuracy"][i, p]) == float((out.argmax(1) == yt).double().mean())


def test_sequential_brownian_increments_are_independent_gaussians_with_the_step_variance():
    """z_k = ΔW_k/√h_k over uneven consecutive steps: mean 0, variance 1, no correlation between steps. With
    n = P·m·K = 64 000 standard normals the sample mean has sd 1/√n ≈ 0.004 and the sample variance sd √(2/n) ≈
    0.0056; the lag-one correlation sd 1/√(n(K−1)/K) ≈ 0.0045 — bounds at 5 sd."""
    steps = torch.tensor([0.0, 0.1, 0.35, 0.4, 1.0, 1.05, 1.7, 2.2, 2.25, 3.0, 3.5], dtype=torch.float64)
    paths, channels = 40, 160
    bm = SequentialBrownian(steps[0], steps[-1], (paths, channels), seed=3)
    z = torch.stack([bm(a, b) / math.sqrt(float(b - a)) for a, b in zip(steps[:-1], steps[1:])])
    n = z.numel()
    assert z.shape == (len(steps) - 1, paths, channels) and z.dtype == torch.float64
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / n)
    lag = float((z[1:] * z[:-1]).mean())
    assert abs(lag) < 5 / math.sqrt(z[1:].numel())
    # the same seed and steps give the same path; another seed another one
    again = SequentialBrownian(steps[0], steps[-1], (paths, channels), seed=3)
    other = SequentialBrownian(steps[0], steps[-1], (paths, channels), seed=4)
    first = [again(a, b) for a, b in zip(steps[:-1], steps[1:])]
    torch.testing.assert_close(torch.stack(first) / torch.sqrt(steps[1:] - steps[:-1])[:, None, None], z,
                               rtol=0, atol=1e-15)
    assert not torch.allclose(other(steps[0], steps[1]), first[0])
    assert bm._flows_count == len(steps) - 1


def test_sequential_brownian_refuses_queries_that_are_not_the_next_increment():
    bm = SequentialBrownian(0.0, 1.0, (2, 3), seed=0)
    bm(0.0, 0.25)
    for bad in [(0.0, 0.5), (0.3, 0.5), (0.25, 0.25), (0.25, 1.5)]:  # a re-query, a gap, an empty step, past t1
        with pytest.raises(ValueError, match="consecutive increments"):
            bm(*bad)
    with pytest.raises(ValueError, match="Lévy area"):
        bm(0.25, 0.5, return_U=True)
    with pytest.raises(ValueError, match="increment queries"):
        bm(0.25)
    with pytest.raises(ValueError, match="t0 < t1"):
        SequentialBrownian(1.0, 1.0, (2, 3))


def test_euler_draws_sequential_increments_and_other_methods_the_brownian_interval():
    """simulate_sde's own Brownian motion: sequential for fixed-step Euler (one increment per step, reproducible by
    seed), a BrownianInterval where the solver needs more (adaptive steps re-query sub-intervals)."""
    problem = regression_problem()
    t = torch.tensor([0.0, 0.5])
    runs = [flows.simulate_sde(problem, problem.theta0, t, lr=0.05, batch_size=4, paths=3, seed=s, progress=False,
                               record=False) for s in (7, 7, 8)]
    assert runs[0].stats["increments"] == 10 and runs[0].metadata["seed"] == 7
    torch.testing.assert_close(runs[0].theta, runs[1].theta, rtol=0, atol=0)
    assert not torch.allclose(runs[0].theta[-1], runs[2].theta[-1])
    with pytest.warns(UserWarning, match="adaptive"):  # torchsde's own caution for adaptive Euler–Maruyama
        adaptive = flows.simulate_sde(problem, problem.theta0, t, lr=0.05, batch_size=4, paths=3, adaptive=True,
                                      progress=False, record=False)
    assert bool(torch.isfinite(adaptive.theta).all())
