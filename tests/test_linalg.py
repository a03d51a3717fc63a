"""flows.linalg: the panel-wise K Kᵀ equals the plain product, also batched and under vmap; the composite softmax and
norms equal torch's and have every derivative right."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flows.linalg import GRAM_MIN_ROWS, SOFTMAX_MAX_CLASSES, SOFTMAX_MIN_ROWS, gram, softmax, spd_solve


@given(d=st.integers(1, 2 * GRAM_MIN_ROWS + 37), n=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_gram_equals_the_plain_product(d, n, seed):
    k = torch.randn(d, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    out = gram(k)
    torch.testing.assert_close(out, k @ k.T, rtol=1e-13, atol=1e-12)


def test_gram_batches_and_vmaps():
    k = torch.randn(3, GRAM_MIN_ROWS + 5, 7, dtype=torch.float64)
    reference = k @ k.mT
    torch.testing.assert_close(gram(k), reference, rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(torch.func.vmap(gram)(k), reference, rtol=1e-13, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(rows=st.sampled_from([3, SOFTMAX_MIN_ROWS - 1, SOFTMAX_MIN_ROWS + 7]),
       classes=st.sampled_from([1, 2, 10, SOFTMAX_MAX_CLASSES, SOFTMAX_MAX_CLASSES + 1]), seed=st.integers(0, 2**16))
def test_softmax_equals_torch_with_its_derivatives_also_vmapped(rows, classes, seed):
    """On both sides of the switch to the composite form (many short rows): the values, a vjp, and a jvp of the vjp
    (second order, with the detached shift) equal torch.softmax's; large logits do not overflow."""
    gen = torch.Generator().manual_seed(seed)
    z = 30 * torch.randn(2, rows, classes, dtype=torch.float64, generator=gen)
    u, v = torch.randn_like(z), torch.randn_like(z)
    torch.testing.assert_close(softmax(z), torch.softmax(z, -1), rtol=1e-13, atol=1e-300)
    torch.testing.assert_close(torch.func.vmap(softmax)(z), torch.softmax(z, -1), rtol=1e-13, atol=1e-300)

    def second(f):
        return torch.func.jvp(lambda a: torch.func.vjp(f, a)[1](u)[0], (z,), (v,))

    for mine, theirs in zip(second(softmax), second(lambda a: torch.softmax(a, -1))):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)


def _forward_over_batched_reverse(f, theta, v):
    """A JVP of a vmapped vjp (the composition inside torch.func.hessian): the one PyTorch 2.13's fused layer-norm
    kernel gets wrong."""
    def batched_grad(t):
        _, pull = torch.func.vjp(f, t)
        return torch.func.vmap(pull)(torch.ones(1, dtype=t.dtype))[0][0]

    return torch.func.jvp(batched_grad, (theta,), (v,))[1]


@given(rows=st.integers(1, 4), width=st.integers(2, 6), seed=st.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
def test_composite_norms_equal_torch_and_have_right_derivatives_in_every_composition(rows, width, seed):
    """layer_norm / instance_norm equal torch's to rounding; their Hessian–vector products by forward over batched
    reverse equal forward over plain reverse (torch.func.jvp of torch.func.grad, which is right for either kernel)."""
    from flows.linalg import instance_norm, layer_norm

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 3, width, generator=gen, dtype=torch.float64)
    w, b = torch.randn(2, width, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(layer_norm(x, (width,), w, b), F.layer_norm(x, (width,), w, b), rtol=1e-12, atol=1e-12)
    wc, bc = torch.randn(2, 3, generator=gen, dtype=torch.float64)  # instance norm: one weight per channel (3)
    torch.testing.assert_close(instance_norm(x, weight=wc, bias=bc), F.instance_norm(x, weight=wc, bias=bc),
                               rtol=1e-12, atol=1e-12)
    weights = torch.randn(rows, 3, width, generator=gen, dtype=torch.float64)

    def loss(norm, per_channel):
        n = 3 if per_channel else width

        def f(theta):
            xx, ww, bb = torch.split(theta, [x.numel(), n, n])
            if per_channel:
                out = norm(xx.reshape(x.shape), weight=ww, bias=bb)
            else:
                out = norm(xx.reshape(x.shape), (width,), ww, bb)
            return ((out * weights) ** 3).sum()
        return f

    for norm, fused, per_channel, (ww, bb) in ((layer_norm, F.layer_norm, False, (w, b)),
                                               (instance_norm, F.instance_norm, True, (wc, bc))):
        theta = torch.cat([x.reshape(-1), ww, bb])
        v = torch.randn(theta.shape, generator=gen, dtype=torch.float64)
        reference = torch.func.jvp(torch.func.grad(loss(fused, per_channel)), (theta,), (v,))[1]
        got = _forward_over_batched_reverse(loss(norm, per_channel), theta, v)
        torch.testing.assert_close(got, reference, rtol=1e-10, atol=1e-10 * float(reference.abs().max()))


def test_composed_norms_swaps_the_functional_norms_and_restores_them_once_on_the_last_exit():
    from flows.linalg import composed_norms, instance_norm, layer_norm

    fused_layer, fused_instance = F.layer_norm, F.instance_norm
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    with composed_norms():
        assert F.layer_norm is layer_norm and F.instance_norm is instance_norm
        with composed_norms():
            assert F.layer_norm is layer_norm
        assert F.layer_norm is layer_norm  # the inner exit leaves the outer context's swap in place
        module = torch.nn.LayerNorm(5, dtype=torch.float64)
        torch.testing.assert_close(module(x), fused_layer(x, (5,), module.weight, module.bias), rtol=1e-12, atol=1e-12)
        # running statistics: an affine map, computed by torch's own kernel (no recursion into the swap)
        mean, var = torch.zeros(3, dtype=torch.float64), torch.full((3,), 2.0, dtype=torch.float64)
        torch.testing.assert_close(F.instance_norm(x, mean, var, use_input_stats=False), x / (2.0 + 1e-5) ** 0.5)
    assert F.layer_norm is fused_layer and F.instance_norm is fused_instance


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), k=st.sampled_from([None, 1, 3]), seed=st.integers(0, 2**16))
def test_spd_solve_solves_and_refuses_an_indefinite_matrix(n, k, seed):
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(n, n + 2, dtype=torch.float64, generator=gen)
    a = f @ f.T + 1e-3 * torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, dtype=torch.float64, generator=gen) if k is None else torch.randn(n, k, dtype=torch.float64,
                                                                                          generator=gen)
    x = spd_solve(a, b)
    assert x.shape == b.shape
    torch.testing.assert_close(a @ x, b, rtol=1e-9, atol=1e-9 * float(b.abs().max()))
    bad = a - 2 * float(torch.linalg.eigvalsh(a)[-1]) * torch.eye(n, dtype=torch.float64)
    with pytest.raises(torch.linalg.LinAlgError):
        spd_solve(bad, b)
