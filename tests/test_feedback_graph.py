"""Feedback alignment and direct feedback alignment on convolutional, residual and branching networks (issue 12.4),
against autograd: with the forward weights as feedback FA is backprop (problem.grad); with random feedback it
equals a reference written here with custom autograd Functions whose backward uses the feedback tensor (conv
gradients by torch.nn.grad, not the library's unfolded patches); DFA against its per-layer definition with the
weight gradient from autograd."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flows
from flows.rules import DirectFeedbackAlignment, FeedbackAlignment

F64 = torch.float64


def _rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


class ResidualCNN(nn.Module):
    """conv → tanh → (+ tanh(conv)) residual → strided conv → tanh → flatten → Linear, on 1 × 8 × 8 images."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1, dtype=F64)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1, dtype=F64)
        self.conv3 = nn.Conv2d(3, 4, 3, padding=1, stride=2, dtype=F64)
        self.head = nn.Linear(4 * 4 * 4, 5, dtype=F64)

    def forward(self, x):
        h = torch.tanh(self.conv1(x))
        h = h + torch.tanh(self.conv2(h))
        return self.head(torch.flatten(torch.tanh(self.conv3(h)), 1))


def plain_cnn():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, dtype=F64), nn.Tanh(),
                         nn.Conv2d(4, 4, 3, padding=1, stride=2, dtype=F64), nn.Tanh(),
                         nn.Flatten(), nn.Linear(4 * 16, 5, dtype=F64))


class BranchMLP(nn.Module):
    """A residual block and two branches merged by concatenation."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.inp = nn.Linear(6, 8, dtype=F64)
        self.res = nn.Linear(8, 8, dtype=F64)
        self.left = nn.Linear(8, 4, dtype=F64)
        self.right = nn.Linear(8, 3, dtype=F64)
        self.out = nn.Linear(7, 5, dtype=F64)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = h + torch.tanh(self.res(h))
        return self.out(torch.cat([torch.tanh(self.left(h)), torch.sigmoid(self.right(h))], dim=1))


def _images(b=6):
    torch.manual_seed(3)
    return torch.randn(b, 1, 8, 8, dtype=F64), torch.tensor([0, 1, 2, 3, 4, 0][:b])


def _problems():
    x, y = _images()
    torch.manual_seed(4)
    return {"residual cnn": flows.Problem(ResidualCNN(), "cross_entropy", (x, y)),
            "cnn": flows.Problem(plain_cnn(), "cross_entropy", (x, y)),
            "branch mlp": flows.Problem(BranchMLP(), "cross_entropy",
                                        (torch.randn(6, 6, dtype=F64), torch.tensor([0, 1, 2, 3, 4, 0])))}


def _weights(problem):
    return {name.removesuffix(".weight"): w for name, w in problem.unflatten(problem.theta0).items()
            if name.endswith(".weight")}


@pytest.mark.parametrize("name", ["residual cnn", "cnn", "branch mlp"])
def test_feedback_alignment_with_the_forward_weights_is_backprop(name):
    problem = _problems()[name]
    fa = FeedbackAlignment(problem, feedback=_weights(problem))
    g = problem.grad(problem.theta0)
    assert _rel(-fa(0.0, problem.theta0), g) <= 1e-10
    # random feedback: the output layer still sees the true error, the others do not
    random_fa = FeedbackAlignment(problem, seed=5)
    direction = random_fa.pseudo_gradient(problem.theta0)
    last = problem.blocks[-1].slice
    assert _rel(direction[last], g[last]) <= 1e-10
    assert _rel(direction, g) > 1e-2


class _FALinear(torch.autograd.Function):
    @staticmethod
    def forward(x, w, b, f):
        return x @ w.T + b

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], inputs[3])

    @staticmethod
    def backward(ctx, g):
        x, f = ctx.saved_tensors
        return g @ f, g.T @ x, g.sum(0), None


class _FAConv2d(torch.autograd.Function):
    @staticmethod
    def forward(x, w, b, f, stride, padding):
        return F.conv2d(x, w, b, stride, padding)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, _, f, stride, padding = inputs
        ctx.save_for_backward(x, w, f)
        ctx.conf = (stride, padding)

    @staticmethod
    def backward(ctx, g):
        x, w, f = ctx.saved_tensors
        stride, padding = ctx.conf
        gx = torch.nn.grad.conv2d_input(x.shape, f, g, stride, padding)
        gw = torch.nn.grad.conv2d_weight(x, w.shape, g, stride, padding)
        return gx, gw, g.sum((0, 2, 3)), None, None, None


def test_random_feedback_alignment_on_a_residual_cnn_matches_a_hand_written_reference():
    problem = _problems()["residual cnn"]
    fa = FeedbackAlignment(problem, seed=7)
    p = {n: q.detach().clone().requires_grad_(True) for n, q in problem.unflatten(problem.theta0).items()}
    fb = fa.feedback

    def conv(name, t, stride=1):
        return _FAConv2d.apply(t, p[f"{name}.weight"], p[f"{name}.bias"], fb[name], (stride, stride), (1, 1))

    h = torch.tanh(conv("conv1", problem.inputs))
    h = h + torch.tanh(conv("conv2", h))
    y = _FALinear.apply(torch.tanh(conv("conv3", h, 2)).flatten(1), p["head.weight"], p["head.bias"], fb["head"])
    F.cross_entropy(y, problem.targets).backward()
    expected = torch.cat([p[n].grad.reshape(-1) for n in problem.unflatten(problem.theta0)])
    assert _rel(fa.pseudo_gradient(problem.theta0), expected) <= 1e-10
    # a batch of θ moves each member under the same feedback
    thetas = torch.stack([problem.theta0, 1.1 * problem.theta0])
    batch = fa.pseudo_gradient(thetas)
    assert _rel(batch[0], expected) <= 1e-10
    assert _rel(batch[1], fa.pseudo_gradient(thetas[1])) <= 1e-12


def test_random_feedback_has_the_weights_shape_and_init_scale():
    """Each F_a ~ U(−c, c), c = 1/√fan_in (torch's bound for Conv/Linear init). The second moment of n draws has
    mean c²/3 and relative standard deviation √(Var x²)/(E x² √n) = √(4/45)·3/√n ≈ 0.894/√n; 5σ at n = 2304
    (conv 16→16, 3×3) is 0.093."""
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, dtype=F64), nn.Tanh(),
                          nn.Conv2d(16, 16, 3, padding=1, dtype=F64), nn.Tanh(), nn.Flatten(),
                          nn.Linear(16 * 64, 3, dtype=F64))
    x, y = _images(3)
    problem = flows.Problem(model, "cross_entropy", (x, y % 3))
    fa = FeedbackAlignment(problem, seed=11)
    weights = _weights(problem)
    for name, f in fa.feedback.items():
        assert f.shape == weights[name].shape
        bound = 1 / weights[name][0].numel() ** 0.5
        assert float(f.abs().max()) <= bound
    f = fa.feedback["2"]
    moment = float((f * f).mean()) / (1 / (16 * 9) / 3)
    assert abs(moment - 1) <= 5 * 0.894 / f.numel() ** 0.5
    assert torch.equal(FeedbackAlignment(problem, seed=11).feedback["2"], f)
    assert not torch.equal(FeedbackAlignment(problem, seed=12).feedback["2"], f)


@pytest.mark.parametrize("name", ["residual cnn", "branch mlp"])
def test_direct_feedback_alignment_projects_the_error_to_each_layer_output(name):
    problem = _problems()[name]
    dfa = DirectFeedbackAlignment(problem, seed=3)
    model = problem.model
    p = {n: q.detach().clone().requires_grad_(True) for n, q in problem.unflatten(problem.theta0).items()}
    outs = {}

    def layer(mod_name, t):
        module = model.get_submodule(mod_name)
        z = torch.func.functional_call(module, {"weight": p[f"{mod_name}.weight"], "bias": p[f"{mod_name}.bias"]},
                                       (t.detach(),))
        outs[mod_name] = z
        return z

    x = problem.inputs
    if name == "residual cnn":
        h = torch.tanh(layer("conv1", x))
        h = h + torch.tanh(layer("conv2", h))
        y = layer("head", torch.flatten(torch.tanh(layer("conv3", h)), 1))
        derivative = {n: 1 - torch.tanh(outs[n]) ** 2 for n in ("conv1", "conv2", "conv3")}
    else:
        h = torch.tanh(layer("inp", x))
        h = h + torch.tanh(layer("res", h))
        y = layer("out", torch.cat([torch.tanh(layer("left", h)), torch.sigmoid(layer("right", h))], dim=1))
        s = torch.sigmoid(outs["right"])
        derivative = {"inp": 1 - torch.tanh(outs["inp"]) ** 2, "res": 1 - torch.tanh(outs["res"]) ** 2,
                      "left": 1 - torch.tanh(outs["left"]) ** 2, "right": s * (1 - s)}
    e = torch.func.grad(lambda out: F.cross_entropy(out, problem.targets))(y.detach())
    surrogate = (outs[list(outs)[-1]] * e).sum()  # the output layer: the true error
    for mod_name, d in derivative.items():
        z = outs[mod_name]
        delta = (e @ dfa.feedback[mod_name]).reshape(z.shape) * d.detach()
        surrogate = surrogate + (z * delta.detach()).sum()
        assert dfa.feedback[mod_name].shape == (5, z[0].numel())
    surrogate.backward()
    expected = torch.cat([p[n].grad.reshape(-1) for n in problem.unflatten(problem.theta0)])
    assert _rel(dfa.pseudo_gradient(problem.theta0), expected) <= 1e-10


class NormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 5, dtype=F64)
        self.norm = nn.LayerNorm(5, dtype=F64)
        self.head = nn.Linear(5, 3, dtype=F64)
        self.scale = nn.Parameter(torch.ones(3, dtype=F64))

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.lin(x)))) * self.scale


class ScaledNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(9)
        self.lin = nn.Linear(4, 5, dtype=F64)
        self.head = nn.Linear(5, 3, dtype=F64)
        self.scale = nn.Parameter(torch.ones(3, dtype=F64) * 1.5)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x))) * self.scale


def test_feedback_rules_refuse_what_they_cannot_sweep_by_name():
    x, y = torch.randn(4, 4, dtype=F64), torch.tensor([0, 1, 2, 0])
    problem = flows.Problem(NormNet(), "cross_entropy", (x, y))
    for rule in (FeedbackAlignment, DirectFeedbackAlignment):
        with pytest.raises(ValueError, match=r"module 'norm' \(LayerNorm\)"):
            rule(problem)
    scaled = flows.Problem(ScaledNet(), "cross_entropy", (x, y))
    with pytest.raises(ValueError, match=r"parameter 'scale' is read directly"):
        DirectFeedbackAlignment(scaled)
    with pytest.raises(ValueError, match=r"feedback given for \['nope'\]"):
        FeedbackAlignment(scaled, feedback={"nope": torch.zeros(5, 4)})
    mlp = flows.Problem(nn.Sequential(nn.Linear(4, 5, dtype=F64), nn.Tanh(), nn.Linear(5, 3, dtype=F64)),
                        "cross_entropy", (x, y))
    with pytest.raises(ValueError, match=r"feedback given for \['2'\], whose output is the model's output"):
        DirectFeedbackAlignment(mlp, feedback={"2": torch.zeros(3, 3)})
    # FA sweeps a parameter read directly: with exact feedback it is backprop there too
    fa = FeedbackAlignment(scaled, feedback=_weights(scaled))
    assert _rel(fa.pseudo_gradient(scaled.theta0), scaled.grad(scaled.theta0)) <= 1e-10
