"""K-FAC on module graphs: the KFC factors of Conv2d/Conv1d layers (Grosse & Martens 2016), Linear layers inside a
residual network and on token sequences, and the exact fallback — each against a reference written here from
scratch: patches cut from a hand-padded input by loops over the output positions (no F.unfold), the output side
from torch.func.jacrev Jacobians of the network tail and the loss's own Hessian (no factor rows of the library),
and dense Kronecker products solved by torch.linalg.solve."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flows
from flows.metrics import KFAC

F64 = torch.float64
GAMMA = 1e-2


def _rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def _output_hessians(y, targets):
    """H_b = ∂²L/∂y_b² of the mean cross-entropy (the 1/B included): (B, C, C). For softmax cross-entropy this is
    the Fisher of the output, the output metric K-FAC uses."""
    h = torch.func.hessian(lambda out: F.cross_entropy(out, targets))(y)
    idx = torch.arange(y.shape[0])
    return h[idx, :, idx, :]


def _gamma_reference(tail, z, hess, channel_dim):
    """Γ = (1/|T|) Σ_b Σ_p J_{b,p}ᵀ H_b J_{b,p}, J_{b,p} = ∂y_b/∂z_{b,:,p} (C × C_out) from jacrev of the network
    tail (layer output z → logits). Σ_r l_{b,r,p} l_{b,r,p}ᵀ = J_{b,p}ᵀ L_bᵀL_b J_{b,p} with L_bᵀL_b = H_b."""
    b = z.shape[0]
    jac = torch.func.jacrev(tail)(z)  # (B, C, B, *z_b)
    idx = torch.arange(b)
    jac = jac[idx, :, idx]  # (B, C, *z_b)
    jac = jac.movedim(2 + channel_dim, 2)  # channels first: (B, C, C_out, *positions)
    jac = jac.reshape(b, jac.shape[1], jac.shape[2], -1)  # (B, C, C_out, |T|)
    positions = jac.shape[-1]
    return torch.einsum("bcop,bcd,bdqp->oq", jac, hess, jac) / positions, positions


def _damped(a, s):
    """Factored Tikhonov damping with π = √((tr Ω/dim Ω)/(tr Γ/dim Γ)) (Martens & Grosse 2015 §6.3)."""
    pi = ((torch.trace(a) / a.shape[0]) / (torch.trace(s) / s.shape[0])) ** 0.5
    return a + GAMMA**0.5 * pi * torch.eye(a.shape[0], dtype=F64), s + GAMMA**0.5 / pi * torch.eye(s.shape[0],
                                                                                                     dtype=F64)


def _kron_solve(a, s, v, bias):
    """(Γ_d ⊗ Ω_d)⁻¹ vec(V̄) densely, with θ's block (W row-major, then b) laid out as V̄ = [W | b]."""
    out = s.shape[0]
    if bias:
        w, b = v[: v.numel() - out].reshape(out, -1), v[v.numel() - out:]
        mat = torch.cat([w, b[:, None]], dim=1)
    else:
        mat = v.reshape(out, -1)
    a_d, s_d = _damped(a, s)
    x = torch.linalg.solve(torch.kron(s_d, a_d), mat.reshape(-1)).reshape(mat.shape)
    return torch.cat([x[:, :-1].reshape(-1), x[:, -1]]) if bias else x.reshape(-1)


def _hand_patches_2d(x, kernel, stride, padding, dilation):
    """ā_{b,p} for every output position p by slicing the zero-padded input (channel, then kernel row, column)."""
    b, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    padded = torch.zeros(b, c, h + 2 * ph, w + 2 * pw, dtype=x.dtype)
    padded[:, :, ph:ph + h, pw:pw + w] = x
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    patches = []
    for i in range(ho):
        for j in range(wo):
            cut = padded[:, :, i * sh: i * sh + dh * (kh - 1) + 1: dh, j * sw: j * sw + dw * (kw - 1) + 1: dw]
            patches.append(cut.reshape(b, -1))
    return torch.stack(patches, dim=1)  # (B, |T|, C_in·kh·kw), positions row-major


def _hand_patches_1d(x, k, stride, padding, dilation):
    b, c, n = x.shape
    padded = torch.zeros(b, c, n + 2 * padding, dtype=x.dtype)
    padded[:, :, padding:padding + n] = x
    no = (n + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    return torch.stack([padded[:, :, i * stride: i * stride + dilation * (k - 1) + 1: dilation].reshape(b, -1)
                        for i in range(no)], dim=1)


def _omega(patches, bias):
    """Ω = (1/B) Σ_b Σ_p ā ā ᵀ from patches (B, |T|, m), the bias a trailing 1."""
    if bias:
        patches = torch.cat([patches, torch.ones(*patches.shape[:2], 1, dtype=F64)], dim=2)
    return torch.einsum("bpi,bpj->ij", patches, patches) / patches.shape[0]


def _check_block(kfac, problem, name, a_ref, s_ref, positions, v, tol=1e-10):
    f = kfac.factors(problem.theta0)[name]
    assert f.positions == positions
    assert _rel(f.a, a_ref) <= tol
    assert _rel(f.s, s_ref) <= tol
    sl = next(b.slice for b in problem.blocks if b.name == name)
    expected = _kron_solve(a_ref, s_ref, v[sl], f.bias)
    assert _rel(kfac.solve(problem.theta0, v)[sl], expected) <= tol
    return expected


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1, dtype=F64)
        self.conv2 = nn.Conv2d(3, 4, (2, 3), stride=2, padding=(1, 0), dilation=(2, 1), dtype=F64)
        self.head = nn.Linear(4 * 3 * 2, 3, dtype=F64)

    def forward(self, x):
        return self.head(torch.tanh(self.conv2(torch.tanh(self.conv1(x)))).flatten(1))


def test_kfc_factors_of_a_small_cnn_match_hand_patches_and_jacobians():
    torch.manual_seed(1)
    x = torch.randn(3, 2, 5, 6, dtype=F64)
    targets = torch.tensor([0, 2, 1])
    model = SmallCNN()
    problem = flows.Problem(model, "cross_entropy", (x, targets))
    kfac = KFAC(problem, damping=GAMMA)
    assert kfac.describe()["forms"] == {"conv1": "kfc", "conv2": "kfc", "head": "kfac"}
    p = {n: q.detach() for n, q in model.named_parameters()}
    c1, c2 = model.conv1, model.conv2

    # hand forward, and the patches of each conv by slicing (checked against the conv itself)
    u1 = _hand_patches_2d(x, c1.kernel_size, c1.stride, c1.padding, c1.dilation)
    z1 = F.conv2d(x, p["conv1.weight"], p["conv1.bias"], padding=1)
    by_patches = u1 @ p["conv1.weight"].reshape(3, -1).T + p["conv1.bias"]
    assert torch.allclose(by_patches.transpose(1, 2).reshape(z1.shape), z1, atol=1e-13)
    h1 = torch.tanh(z1)
    u2 = _hand_patches_2d(h1, c2.kernel_size, c2.stride, c2.padding, c2.dilation)
    z2 = F.conv2d(h1, p["conv2.weight"], p["conv2.bias"], stride=2, padding=(1, 0), dilation=(2, 1))
    by_patches = u2 @ p["conv2.weight"].reshape(4, -1).T + p["conv2.bias"]
    assert torch.allclose(by_patches.transpose(1, 2).reshape(z2.shape), z2, atol=1e-13)
    h2 = torch.tanh(z2).flatten(1)
    y = F.linear(h2, p["head.weight"], p["head.bias"])
    hess = _output_hessians(y, targets)

    def tail2(z):
        return F.linear(torch.tanh(z).flatten(1), p["head.weight"], p["head.bias"])

    def tail1(z):
        return tail2(F.conv2d(torch.tanh(z), p["conv2.weight"], p["conv2.bias"], stride=2, padding=(1, 0),
                              dilation=(2, 1)))

    v = torch.randn(problem.num_params, dtype=F64)
    s1, t1 = _gamma_reference(tail1, z1, hess, 0)
    s2, t2 = _gamma_reference(tail2, z2, hess, 0)
    s3, t3 = _gamma_reference(lambda out: out, y, hess, 0)
    assert (t1, t2, t3) == (30, 6, 1)
    expected = torch.cat([_check_block(kfac, problem, "conv1", _omega(u1, True), s1, t1, v),
                          _check_block(kfac, problem, "conv2", _omega(u2, True), s2, t2, v),
                          _check_block(kfac, problem, "head", _omega(h2[:, None], True), s3, t3, v)])
    assert _rel(kfac.solve(problem.theta0, v), expected) <= 1e-10
    # the dense matrix is the same operator, and the fused direction is the solve of the autograd gradient
    assert _rel(torch.linalg.solve(kfac.matrix(problem.theta0), v), expected) <= 1e-10
    g = problem.grad(problem.theta0)
    assert _rel(kfac.natural_direction(problem.theta0), kfac.solve(problem.theta0, g)) <= 1e-10


@pytest.mark.parametrize("channels", [3, 8])  # Γ by per-row products (5 positions ≥ 3 channels) and by one GEMM
def test_kfc_factors_of_a_conv1d_without_bias(channels):
    torch.manual_seed(2)
    conv = nn.Conv1d(2, channels, 3, stride=2, padding=2, dilation=2, bias=False, dtype=F64)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(channels * 5, 4, dtype=F64))
    x = torch.randn(5, 2, 9, dtype=F64)
    targets = torch.tensor([0, 1, 2, 3, 1])
    problem = flows.Problem(model, "cross_entropy", (x, targets))
    kfac = KFAC(problem, damping=GAMMA)
    w, head_w, head_b = conv.weight.detach(), model[3].weight.detach(), model[3].bias.detach()
    u = _hand_patches_1d(x, 3, 2, 2, 2)
    z = F.conv1d(x, w, stride=2, padding=2, dilation=2)
    assert torch.allclose((u @ w.reshape(channels, -1).T).transpose(1, 2), z, atol=1e-13)

    def tail(zz):
        return F.linear(torch.tanh(zz).flatten(1), head_w, head_b)

    hess = _output_hessians(tail(z), targets)
    s, positions = _gamma_reference(tail, z, hess, 0)
    assert positions == 5
    v = torch.randn(problem.num_params, dtype=F64)
    _check_block(kfac, problem, "0", _omega(u, False), s, positions, v)


class ResidualMLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.inp = nn.Linear(4, 6, dtype=F64)
        self.res = nn.Linear(6, 6, dtype=F64)
        self.out = nn.Linear(6, 3, dtype=F64)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(h + torch.tanh(self.res(h)))


def test_kfac_on_a_residual_mlp_against_dense_factors():
    torch.manual_seed(4)
    x, targets = torch.randn(6, 4, dtype=F64), torch.tensor([0, 1, 2, 0, 1, 2])
    model = ResidualMLP()
    problem = flows.Problem(model, "cross_entropy", (x, targets))
    kfac = KFAC(problem, damping=GAMMA)
    assert kfac.describe()["forms"] == {"inp": "kfac", "res": "kfac", "out": "kfac"}
    p = {n: q.detach() for n, q in model.named_parameters()}

    def lin(name, t):
        return F.linear(t, p[f"{name}.weight"], p[f"{name}.bias"])

    z_inp = lin("inp", x)
    h = torch.tanh(z_inp)
    z_res = lin("res", h)
    r = h + torch.tanh(z_res)
    y = lin("out", r)
    hess = _output_hessians(y, targets)

    def from_inp(z):  # the residual path and the skip both carry the costate back to the first layer
        hh = torch.tanh(z)
        return lin("out", hh + torch.tanh(lin("res", hh)))

    v = torch.randn(problem.num_params, dtype=F64)
    for name, inputs, tail, z in (("inp", x, from_inp, z_inp),
                                  ("res", h, lambda zz: lin("out", h + torch.tanh(zz)), z_res),
                                  ("out", r, lambda zz: zz, y)):
        s, positions = _gamma_reference(tail, z, hess, 0)
        _check_block(kfac, problem, name, _omega(inputs[:, None], True), s, positions, v)


class TokenMLP(nn.Module):
    """A Linear layer on (B, T, features) inputs, as in a transformer, then mean pooling and a head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.mix = nn.Linear(3, 5, dtype=F64)
        self.head = nn.Linear(5, 4, dtype=F64)

    def forward(self, x):
        return self.head(torch.tanh(self.mix(x)).mean(dim=1))


def test_kfac_on_a_linear_with_token_inputs_sums_positions():
    torch.manual_seed(6)
    x, targets = torch.randn(4, 7, 3, dtype=F64), torch.tensor([0, 3, 1, 2])
    model = TokenMLP()
    problem = flows.Problem(model, "cross_entropy", (x, targets))
    kfac = KFAC(problem, damping=GAMMA)
    p = {n: q.detach() for n, q in model.named_parameters()}
    z = F.linear(x, p["mix.weight"], p["mix.bias"])

    def tail(zz):
        return F.linear(torch.tanh(zz).mean(dim=1), p["head.weight"], p["head.bias"])

    hess = _output_hessians(tail(z), targets)
    s, positions = _gamma_reference(tail, z, hess, 1)  # channels last: z_b is (T, out)
    assert positions == 7
    v = torch.randn(problem.num_params, dtype=F64)
    _check_block(kfac, problem, "mix", _omega(x, True), s, positions, v)
    # at one sample and one token the factorisation is exact: damped K-FAC → the exact damped block
    one = flows.Problem(model, "cross_entropy", (x[:1, :1], targets[:1]))
    f = KFAC(one, damping=GAMMA).factors(one.theta0)["mix"]
    jac = torch.func.jacrev(lambda w: F.linear(torch.tanh(F.linear(x[:1, :1], w[:, :3], w[:, 3])).mean(1),
                                              p["head.weight"], p["head.bias"]))(
        torch.cat([p["mix.weight"], p["mix.bias"][:, None]], dim=1))[0].reshape(4, -1)
    exact = jac.T @ _output_hessians(tail(z[:1, :1]), targets[:1])[0] @ jac
    assert _rel(torch.kron(f.s, f.a), exact) <= 1e-10


class NormModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.lin = nn.Linear(4, 5, dtype=F64)
        self.norm = nn.LayerNorm(5, dtype=F64)
        self.head = nn.Linear(5, 3, dtype=F64)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.lin(x))))


def test_blocks_without_a_kronecker_form_are_exact_or_refused_by_name():
    torch.manual_seed(8)
    x, targets = torch.randn(5, 4, dtype=F64), torch.tensor([0, 1, 2, 1, 0])
    model = NormModel()
    problem = flows.Problem(model, "cross_entropy", (x, targets))
    kfac = KFAC(problem, damping=GAMMA)
    assert kfac.describe()["forms"] == {"lin": "kfac", "norm": "exact", "head": "kfac"}
    sl = next(b.slice for b in problem.blocks if b.name == "norm")
    theta = problem.theta0

    def logits(w_norm):
        full = torch.cat([theta[:sl.start], w_norm, theta[sl.stop:]])
        return torch.func.functional_call(model, problem.unflatten(full), (x,))

    jac = torch.func.jacrev(logits)(theta[sl])  # (B, C, n)
    hess = _output_hessians(logits(theta[sl]), targets)
    exact = GAMMA * torch.eye(sl.stop - sl.start, dtype=F64) + torch.einsum("bcn,bcd,bdm->nm", jac, hess, jac)
    v = torch.randn(problem.num_params, dtype=F64)
    assert _rel(kfac.solve(theta, v)[sl], torch.linalg.solve(exact, v[sl])) <= 1e-10
    with pytest.raises(ValueError, match=r"block 'norm'.*'norm' is a LayerNorm"):
        KFAC(problem, damping=GAMMA, fallback="error")
    with pytest.raises(ValueError, match="unknown fallback"):
        KFAC(problem, fallback="dense")


@pytest.mark.parametrize("model", ["cnn", "normalised"])
def test_direction_from_gradient_coefficients_equals_the_costate_route(model, monkeypatch):
    torch.manual_seed(4)
    if model == "cnn":
        x, net = torch.randn(3, 2, 5, 6, dtype=F64), SmallCNN()
    else:  # Linear (K-FAC), LayerNorm (exact block), Linear
        x, net = torch.randn(5, 4, dtype=F64), NormModel()
    problem = flows.Problem(net, "cross_entropy", (x, torch.tensor([0, 2, 1, 1, 0][: x.shape[0]])))
    kfac = KFAC(problem, damping=GAMMA)
    thetas = torch.stack([problem.theta0, problem.theta0 + 0.1 * torch.randn(problem.num_params, dtype=F64)])
    from flows.metrics import kfac as kfac_module
    from flows.metrics import layerwise
    combined = []
    combine = kfac_module._combine_rows
    monkeypatch.setattr(kfac_module, "_combine_rows", lambda c, rows: combined.append(1) or combine(c, rows))
    by_coefficients = kfac.natural_direction(thetas)
    assert combined  # λ came from the coefficients at the Kronecker layers
    for theta, direction in zip(thetas, by_coefficients):
        assert _rel(direction, kfac.solve(theta, problem.grad(theta))) <= 1e-10
        assert _rel(kfac.natural_direction(theta), direction) <= 1e-12

    def refuse(*args):
        raise AssertionError("λ was recombined from the rows")

    # no coefficients reproduce λ, so it rides along as a row; recombining it from the rows would raise
    monkeypatch.setattr(layerwise, "coefficients_reproduce", lambda rows, c, lam: torch.zeros((), dtype=torch.bool))
    monkeypatch.setattr(kfac_module, "_combine_rows", refuse)
    by_costate = torch.stack([kfac.natural_direction(theta) for theta in thetas])
    assert _rel(by_costate, by_coefficients) <= 1e-12
    # an ensemble tries the coefficients for all members first, then sees the refusal and sweeps again
    monkeypatch.setattr(kfac_module, "_combine_rows", combine)
    routes = []
    direction_one = kfac._direction_one
    monkeypatch.setattr(kfac, "_direction_one", lambda t, **kw: routes.append(kw.get("coefficients")) or
                        direction_one(t, **kw))
    assert _rel(kfac.natural_direction(thetas), by_coefficients) <= 1e-12
    assert routes == [True, False]
