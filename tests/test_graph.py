"""The module graph and its sweep (MATH.md §2.4): costates against autograd at every node, structured against
generic operators, and the errors for models the graph cannot read."""

import contextlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from conftest import block_diagonal_part, dense_gauss_newton, mse_loss
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

import flows
from flows.metrics import Layerwise
from flows.modules import conv as conv_module
from flows.modules import costates, read


class Residual(nn.Module):
    """y = c(h + tanh(b(h))), h = tanh(a(x)): a skip connection and a shared input."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.c(h + torch.tanh(self.b(h)))


def _residual_problem(batch=5):
    torch.manual_seed(3)
    model = Residual().double()
    return flows.Problem(model, "mse", (torch.randn(batch, 3, dtype=torch.float64),
                                        torch.randn(batch, 2, dtype=torch.float64)))


def _rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def test_costates_equal_autograd_at_every_node_of_a_residual_net():
    problem = _residual_problem()
    model, x = problem.model, problem.inputs
    # the same forward written out by hand, every intermediate kept for autograd
    z_a = model.a(x)
    h = torch.tanh(z_a)
    z_b = model.b(h)
    t = torch.tanh(z_b)
    s = h + t
    y = model.c(s)
    loss = mse_loss(y, problem.targets)
    expected = dict(zip(["a", "tanh", "b", "tanh_1", "add", "c"],
                        torch.autograd.grad(loss, [z_a, h, z_b, t, s, y])))
    found = {c.node: c for c in costates(problem, problem.theta0)}
    assert set(found) == set(expected)
    for node, grad in expected.items():
        assert _rel(found[node].costate, grad) <= 1e-12, node
    flat = torch.cat([found[name].grad for name in ("a", "b", "c")])
    assert _rel(flat, problem.grad(problem.theta0)) <= 1e-12


def test_residual_layerwise_is_the_per_module_block_solve_not_the_full_ggn():
    problem = _residual_problem()
    v = torch.randn(problem.num_params, dtype=torch.float64)
    dense = dense_gauss_newton(problem, problem.theta0, 0.2, mse_loss)
    blocks = block_diagonal_part(dense, [b.slice for b in problem.blocks])
    metric = Layerwise(problem, mu=0.2)
    assert metric.describe()["blocks"] == ["a", "b", "c"]
    assert _rel(metric.solve(problem.theta0, v), torch.linalg.solve(blocks, v)) <= 1e-10
    assert _rel(metric.solve(problem.theta0, v), torch.linalg.solve(dense, v)) > 1e-3  # not the full GGN


def test_blocks_by_name_pattern_group_modules():
    problem = _residual_problem()
    metric = Layerwise(problem, mu=0.2, blocks=[["a", "b"], "c"])
    assert metric.describe()["blocks"] == ["a|b", "c"]
    ab = slice(0, problem.blocks[1].stop)
    dense = dense_gauss_newton(problem, problem.theta0, 0.2, mse_loss)
    expected = block_diagonal_part(dense, [ab, problem.blocks[2].slice])
    v = torch.randn(problem.num_params, dtype=torch.float64)
    assert _rel(metric.solve(problem.theta0, v), torch.linalg.solve(expected, v)) <= 1e-10
    assert _rel(metric.natural_direction(problem.theta0),
                torch.linalg.solve(expected, problem.grad(problem.theta0))) <= 1e-10
    with pytest.raises(ValueError, match="matches no parameter"):
        Layerwise(problem, blocks=["nope"])


def test_a_module_called_twice_contributes_both_calls():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.out = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.out(torch.tanh(self.a(torch.tanh(self.a(x)))))

    torch.manual_seed(1)
    problem = flows.Problem(Twice().double(), "mse", (torch.randn(4, 3, dtype=torch.float64),
                                                       torch.randn(4, 2, dtype=torch.float64)))
    dense = dense_gauss_newton(problem, problem.theta0, 0.3, mse_loss)
    expected = block_diagonal_part(dense, [b.slice for b in problem.blocks])
    metric = Layerwise(problem, mu=0.3)
    v = torch.randn(problem.num_params, dtype=torch.float64)
    assert _rel(metric.solve(problem.theta0, v), torch.linalg.solve(expected, v)) <= 1e-10
    assert _rel(metric.natural_direction(problem.theta0),
                torch.linalg.solve(expected, problem.grad(problem.theta0))) <= 1e-10


def test_structured_and_generic_paths_agree():
    problem = _residual_problem()
    v = torch.randn(problem.num_params, dtype=torch.float64)
    fast = Layerwise(problem, mu=0.1, solver="dual")
    slow = Layerwise(problem, mu=0.1, solver="dual", structured=False)
    assert type(fast.graph.by_name["a"].ops).__name__ == "LinearOps"
    assert type(slow.graph.by_name["a"].ops).__name__ == "GenericOps"
    assert _rel(fast.solve(problem.theta0, v), slow.solve(problem.theta0, v)) <= 1e-12


def test_batch_norm_in_training_mode_is_refused_by_name():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    with pytest.raises(ValueError, match="module '1' .*BatchNorm1d.*couples the samples"):
        read(model)


def test_untraceable_control_flow_is_refused_by_name():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)

        def forward(self, x):
            return self.a(x) if x.sum() > 0 else -self.a(x)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.out = Branchy(), nn.Linear(3, 1)

        def forward(self, x):
            return self.out(self.inner(x))

    with pytest.raises(ValueError, match="failed to trace module 'inner'"):
        read(Outer().double())


def test_in_place_operations_are_refused_by_name():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)).double()
    with pytest.raises(ValueError, match="module '1' works in place"):
        read(model)


def test_operations_that_mix_samples_are_refused_by_name():
    class Centre(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = self.a(x)
            return self.b(h - h.mean(0))

    torch.manual_seed(0)
    problem = flows.Problem(Centre().double(), "mse", (torch.randn(4, 3, dtype=torch.float64),
                                                        torch.randn(4, 2, dtype=torch.float64)))
    with pytest.raises(ValueError, match="'mean'.*mixes samples"):
        Layerwise(problem)


class _Convs(nn.Module):
    """Conv2d (stride 2, padding 1) → Conv1d over flattened rows (no bias) → Linear."""

    def __init__(self):
        super().__init__()
        self.c2 = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.c1 = nn.Conv1d(3, 2, 2, bias=False, dilation=2)
        self.fc = nn.Linear(2 * 7, 3)

    def forward(self, x):
        h = torch.tanh(self.c2(x))  # (B, 3, 3, 3)
        h = torch.tanh(self.c1(h.flatten(2)))  # (B, 2, 7)
        return self.fc(h.flatten(1))


def test_structured_convolutions_equal_the_generic_path_and_the_dense_blocks():
    torch.manual_seed(2)
    problem = flows.Problem(_Convs().double(), "cross_entropy",
                            (torch.randn(4, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (4,))))
    v = torch.randn(problem.num_params, dtype=torch.float64)
    for solver in ("dual", "primal"):
        fast = Layerwise(problem, mu=0.2, solver=solver)
        slow = Layerwise(problem, mu=0.2, solver=solver, structured=False)
        assert {n: type(fast.graph.by_name[n].ops).__name__ for n in ("c2", "c1")} == {"c2": "ConvOps", "c1": "ConvOps"}
        assert type(slow.graph.by_name["c2"].ops).__name__ == "GenericOps"
        assert _rel(fast.solve(problem.theta0, v), slow.solve(problem.theta0, v)) <= 1e-12
        assert _rel(fast.natural_direction(problem.theta0), slow.natural_direction(problem.theta0)) <= 1e-12
    from conftest import ce_loss

    dense = dense_gauss_newton(problem, problem.theta0, 0.2, ce_loss)
    expected = block_diagonal_part(dense, [b.slice for b in problem.blocks])
    assert _rel(fast.solve(problem.theta0, v), torch.linalg.solve(expected, v)) <= 1e-10


class _Shapes(nn.Module):
    """Every data-movement glue ShapeOps covers, between two Linear layers: view, permute, nn.Unflatten, transpose,
    contiguous, torch.flatten, reshape and nn.Flatten."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 12), nn.Linear(12, 2)
        self.unflatten, self.flatten = nn.Unflatten(1, (2, 3, 2)), nn.Flatten()

    def forward(self, x):
        h = torch.tanh(self.a(x)).view(-1, 3, 4).permute(0, 2, 1)  # (B, 4, 3)
        h = self.unflatten(torch.flatten(h, 1)).transpose(1, 3).contiguous()  # (B, 2, 3, 2)
        return self.b(self.flatten(h.reshape(-1, 6, 2)))


def test_data_movement_glue_pulls_rows_by_the_inverse_permutation():
    """The structured pull (no derivative) equals the generic per-sample vjps, and both the dense blocks."""
    torch.manual_seed(5)
    problem = flows.Problem(_Shapes().double(), "mse", (torch.randn(5, 6, dtype=torch.float64),
                                                      torch.randn(5, 2, dtype=torch.float64)))
    v = torch.randn(problem.num_params, dtype=torch.float64)
    fast = Layerwise(problem, mu=0.3, solver="dual")
    slow = Layerwise(problem, mu=0.3, solver="dual", structured=False)
    glue = [n for n in fast.graph.nodes if n.kind == "glue" and n.name != "tanh"]
    assert len(glue) == 8 and all(type(n.ops).__name__ == "ShapeOps" for n in glue), \
        [(n.name, type(n.ops).__name__) for n in glue]
    assert all(type(n.ops).__name__ == "GenericOps" for n in slow.graph.nodes if n.kind == "glue" and n.name != "tanh")
    assert _rel(fast.solve(problem.theta0, v), slow.solve(problem.theta0, v)) <= 1e-12
    assert _rel(fast.natural_direction(problem.theta0), slow.natural_direction(problem.theta0)) <= 1e-12
    dense = dense_gauss_newton(problem, problem.theta0, 0.3, mse_loss)
    expected = block_diagonal_part(dense, [b.slice for b in problem.blocks])
    assert _rel(fast.solve(problem.theta0, v), torch.linalg.solve(expected, v)) <= 1e-10
    transpose = next(n for n in glue if n.fx_node.target == "transpose")  # a real permutation, not a reshape
    assert isinstance(transpose.ops.inverse_permutation(torch.Size([2, 3, 2]), "cpu"), torch.Tensor)


def test_glue_that_is_not_a_permutation_keeps_the_generic_path():
    from flows.modules import GenericOps, ShapeOps

    def doubled(p, ins):  # repeats every entry: not a permutation, so the Jacobian is not one either
        return ins[0].repeat(1, 2)

    ops = ShapeOps(doubled, GenericOps(doubled, [True], True))
    x = torch.randn(3, 4, dtype=torch.float64)
    rows = torch.randn(3, 2, 8, dtype=torch.float64)
    assert ops.inverse_permutation(torch.Size([4]), "cpu") is False
    expected = rows[:, :, :4] + rows[:, :, 4:]  # y = (x, x) pulls back as the sum of the two halves
    torch.testing.assert_close(ops.pull({}, [x], rows, [True])[0][0], expected, rtol=0, atol=1e-15)


class _Tokens(nn.Module):
    """Embedding → LayerNorm over tokens → GroupNorm over channels → Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.ln = nn.LayerNorm(4)
        self.gn = nn.GroupNorm(2, 4)
        self.out = nn.Linear(4 * 3, 2)

    def forward(self, x):
        h = torch.tanh(self.ln(self.emb(x)))  # (B, T, 4)
        h = self.gn(h.transpose(1, 2))  # (B, 4, T)
        return self.out(torch.tanh(h).flatten(1))


def test_structured_norms_and_embeddings_equal_the_generic_path_and_the_dense_blocks():
    torch.manual_seed(4)
    model = _Tokens().double()
    with torch.no_grad():  # non-trivial affine parameters
        for m in (model.ln, model.gn):
            m.weight.normal_()
            m.bias.normal_()
    problem = flows.Problem(model, "mse", (torch.randint(0, 7, (5, 3)), torch.randn(5, 2, dtype=torch.float64)))
    v = torch.randn(problem.num_params, dtype=torch.float64)
    fast = Layerwise(problem, mu=0.3)
    slow = Layerwise(problem, mu=0.3, structured=False)
    assert {n: type(fast.graph.by_name[n].ops).__name__ for n in ("emb", "ln", "gn")} == \
        {"emb": "EmbeddingOps", "ln": "NormOps", "gn": "NormOps"}
    assert _rel(fast.solve(problem.theta0, v), slow.solve(problem.theta0, v)) <= 1e-12
    assert _rel(fast.natural_direction(problem.theta0), slow.natural_direction(problem.theta0)) <= 1e-12
    dense = dense_gauss_newton(problem, problem.theta0, 0.3, mse_loss)
    expected = block_diagonal_part(dense, [b.slice for b in problem.blocks])
    assert _rel(fast.solve(problem.theta0, v), torch.linalg.solve(expected, v)) <= 1e-10


def test_tied_weights_sum_the_contributions_of_both_uses():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.mid = nn.Linear(3, 3), nn.Linear(3, 3)
            self.out = nn.Linear(3, 3)
            self.out.weight = self.inp.weight  # tied

        def forward(self, x):
            return self.out(torch.tanh(self.mid(torch.tanh(self.inp(x)))))

    torch.manual_seed(5)
    data = (torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="shares parameters"):
        flows.Problem(Tied().double(), "mse", data)
    problem = flows.Problem(Tied().double(), "mse", data, blocks=["inp", "mid", "out"])
    metric = Layerwise(problem, mu=0.4)
    dense = dense_gauss_newton(problem, problem.theta0, 0.4, mse_loss)
    expected = block_diagonal_part(dense, [b.slice for b in problem.blocks])
    v = torch.randn(problem.num_params, dtype=torch.float64)
    assert _rel(metric.solve(problem.theta0, v), torch.linalg.solve(expected, v)) <= 1e-10
    assert _rel(metric.natural_direction(problem.theta0),
                torch.linalg.solve(expected, problem.grad(problem.theta0))) <= 1e-10


def test_a_module_torch_func_cannot_evaluate_per_sample_is_refused_by_name():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3, dtype=torch.float64))

        def forward(self, x):
            return x * self.w * float(x.abs().max())  # .item() on a traced value: no per-sample form

    model = nn.Sequential(nn.Linear(3, 3), Odd(), nn.Linear(3, 1)).double()
    problem = flows.Problem(model, "mse", (torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 1,
                                                                                             dtype=torch.float64)))
    with pytest.raises(ValueError, match="module '1' cannot be evaluated one sample at a time"):
        Layerwise(problem)


def test_forward_arguments_with_defaults_are_fixed_at_them():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x, scale=None, residual=True):
            h = torch.tanh(self.a(x))
            if residual:
                h = h + x
            return self.b(h if scale is None else h * scale)

    torch.manual_seed(6)
    problem = flows.Problem(Keyword().double(), "mse", (torch.randn(4, 3, dtype=torch.float64),
                                                         torch.randn(4, 2, dtype=torch.float64)))
    metric = Layerwise(problem, mu=0.3)
    assert metric.describe()["blocks"] == ["a", "b"]
    dense = dense_gauss_newton(problem, problem.theta0, 0.3, mse_loss)
    expected = block_diagonal_part(dense, [b.slice for b in problem.blocks])
    v = torch.randn(problem.num_params, dtype=torch.float64)
    assert _rel(metric.solve(problem.theta0, v), torch.linalg.solve(expected, v)) <= 1e-10


@given(kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)), stride=st.tuples(st.integers(1, 3), st.integers(1, 2)),
       padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
       dilation=st.tuples(st.integers(1, 2), st.integers(1, 3)), size=st.tuples(st.integers(1, 8), st.integers(1, 7)),
       seed=st.integers(0, 1000), chunk=st.sampled_from([None, 1, 2]))
def test_conv_pull_is_the_vjp_of_the_convolution(kernel, stride, padding, dilation, size, seed, chunk):
    """pull_rows (GEMM to the kernel taps, then col2im by sub-lattice copies and adds) against autograd's vjp of
    F.conv2d; and under vmap over the weight alone (its buffer must be batched when the rows are not) and
    forward-mode AD in the weight, which the ensembles and the moving metric use. ``chunk``: the rows go in
    chunks of that many (the path for large tap products), else in one piece."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 3, *size, generator=g, dtype=torch.float64)
    weight = torch.randn(4, 3, *kernel, generator=g, dtype=torch.float64)
    extent = [s + 2 * p - d * (k - 1) for s, p, d, k in zip(size, padding, dilation, kernel)]
    assume(min(extent) >= 1)

    def conv(inp):
        return F.conv2d(inp, weight, stride=stride, padding=padding, dilation=dilation)

    out, vjp = torch.func.vjp(conv, x)
    rows = torch.randn(out.shape, generator=g, dtype=torch.float64)
    other = torch.randn(weight.shape, generator=g, dtype=torch.float64)
    _, other_vjp = torch.func.vjp(lambda inp: F.conv2d(inp, other, stride=stride, padding=padding,
                                                       dilation=dilation), x)
    expected = torch.stack([vjp(rows)[0], other_vjp(rows)[0]])

    def pull(w):
        return conv_module.pull_rows(rows, w, size, stride, padding, dilation)

    with contextlib.ExitStack() as stack:
        if chunk is not None:  # the threshold at 0 and chunks of exactly ``chunk`` rows (3 rows: 1+1+1 or 2+1)
            per_row = out[0].numel() // weight.shape[0] * weight[0].numel() * 8
            stack.enter_context(mock.patch.object(conv_module, "PULL_WHOLE_BYTES", 0))
            stack.enter_context(mock.patch.object(conv_module, "PULL_CHUNK_BYTES", chunk * per_row))
        pulled = pull(weight)
        batched = torch.func.vmap(pull)(torch.stack([weight, other]))
        _, tangent = torch.func.jvp(pull, (weight,), (other,))
    assert pulled.shape == x.shape
    assert torch.allclose(pulled, expected[0], rtol=1e-12, atol=1e-12)
    assert torch.allclose(batched, expected, rtol=1e-12, atol=1e-12)
    assert torch.allclose(tangent, expected[1], rtol=1e-12, atol=1e-12)  # the pull is linear in the weight


def test_conv_pull_of_no_rows_is_the_empty_input_gradient():
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    rows = torch.zeros(0, 4, 4, 4, dtype=torch.float64)
    expected = torch.nn.grad.conv2d_input((0, 3, 8, 8), weight, rows, stride=2, padding=1)
    for whole in (conv_module.PULL_WHOLE_BYTES, 0):
        with mock.patch.object(conv_module, "PULL_WHOLE_BYTES", whole):
            pulled = conv_module.pull_rows(rows, weight, (8, 8), (2, 2), (1, 1), (1, 1))
        assert pulled.shape == expected.shape == (0, 3, 8, 8)


@given(kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)), stride=st.tuples(st.integers(1, 3), st.integers(1, 2)),
       padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
       dilation=st.tuples(st.integers(1, 2), st.integers(1, 3)), size=st.tuples(st.integers(1, 8), st.integers(1, 7)),
       seed=st.integers(0, 1000))
def test_conv_patches_are_those_of_unfold(kernel, stride, padding, dilation, size, seed):
    """unfold_patches (a copy out of the padded input's window view) equals F.unfold exactly, also under vmap."""
    from flows.modules.conv import unfold_patches
    extent = [s + 2 * p - d * (k - 1) for s, p, d, k in zip(size, padding, dilation, kernel)]
    assume(min(extent) >= 1)
    x = torch.randn(3, 2, 3, *size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    expected = torch.stack([F.unfold(xi, kernel, dilation=dilation, padding=padding, stride=stride) for xi in x])
    assert torch.equal(unfold_patches(x[0], kernel, stride, padding, dilation), expected[0])
    batched = torch.func.vmap(lambda xi: unfold_patches(xi, kernel, stride, padding, dilation))(x)
    assert torch.equal(batched, expected)


@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (2, 1, 1), (3, 2, 2)])
def test_conv1d_pull_is_the_vjp_of_the_convolution(stride, padding, dilation):
    """A Conv1d node pulls its rows as a 1 × L image: against autograd's vjp of F.conv1d, rows (B, R, C_out, L')."""
    from flows.modules.conv import ConvOps
    g = torch.Generator().manual_seed(stride)
    conv = nn.Conv1d(3, 4, 3, stride=stride, padding=padding, dilation=dilation, dtype=torch.float64)
    x = torch.randn(2, 3, 11, generator=g, dtype=torch.float64)
    p = {"weight": conv.weight.detach(), "bias": conv.bias.detach()}
    out, vjp = torch.func.vjp(lambda inp: F.conv1d(inp, p["weight"], p["bias"], stride, padding, dilation), x)
    rows = torch.randn(2, 5, *out.shape[1:], generator=g, dtype=torch.float64)
    pulled = ConvOps(conv).pull(p, [x], rows, [True])[0][0]
    expected = torch.stack([vjp(rows[:, r])[0] for r in range(5)], dim=1)
    assert pulled.shape == expected.shape
    assert torch.allclose(pulled, expected, rtol=1e-12, atol=1e-12)


def test_conv_patches_are_kept_for_the_same_input_only():
    """The forward's patches serve the sweep that follows; a new input, or the same one changed in place, is
    unfolded again."""
    from flows.modules.conv import ConvOps
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=2, dtype=torch.float64)
    ops = ConvOps(conv)
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    p = {"weight": conv.weight.detach(), "bias": conv.bias.detach()}
    assert torch.allclose(ops.forward(p, [x]), conv(x).detach(), rtol=1e-13, atol=1e-14)
    first = ops.patches(x)
    assert ops.patches(x) is first
    x.mul_(2.0)
    assert torch.equal(ops.patches(x), F.unfold(x, 3, padding=1, stride=2))
    y = x.clone()
    assert ops.patches(y) is not ops.patches(x)
    assert torch.allclose(ops.forward(p, [y]), conv(y).detach(), rtol=1e-13, atol=1e-14)
