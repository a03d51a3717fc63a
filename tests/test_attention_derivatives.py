"""Second derivatives and forward-mode products through nn.MultiheadAttention (PyTorch's fused CPU attention kernel
has neither): contraction rates of a transformer's gradient flow against a dense Hessian from torch.func."""

import torch

import flows


def _transformer_problem():
    tokens, labels = flows.data.token_sum(12, length=3, vocab=5)
    model = flows.data.Transformer(vocab=5, length=3, width=4, heads=2, hidden=6, classes=10, seed=1)
    return flows.Problem(model, "cross_entropy", (tokens, labels))


def test_forward_mode_and_hessian_through_attention_match_a_dense_reference():
    problem = _transformer_problem()
    theta = problem.theta0
    rule = flows.rules.GradientFlow(problem, flows.metrics.Euclidean())
    # independent reference: −Hessian of the loss, reverse over reverse, on the model itself
    params = dict(problem.model.named_parameters())
    names = list(params)

    def loss_of(flat):
        pieces = dict(zip(names, torch.split(flat, [p.numel() for p in params.values()])))
        shaped = {n: pieces[n].reshape(params[n].shape) for n in names}
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            out = torch.func.functional_call(problem.model, shaped, (problem.inputs,))
        return torch.nn.functional.cross_entropy(out, problem.targets)

    hessian = torch.func.jacrev(torch.func.grad(loss_of))(theta)
    v = torch.randn_like(theta)
    jv = torch.func.jvp(lambda th: rule(0.0, th), (theta,), (v,))[1]  # forward mode through attention
    torch.testing.assert_close(jv, -hessian @ v, rtol=1e-8, atol=1e-10)
    mu = flows.contraction.rate(rule, theta, method="lanczos", eigenvalues=False, tol=1e-10).mu
    expected = float(torch.linalg.eigvalsh(-0.5 * (hessian + hessian.T))[-1])
    assert abs(mu - expected) <= 1e-7 * max(1.0, abs(expected))


def test_a_model_calling_attention_directly_is_differentiable_in_forward_mode():
    """The probe at construction finds F.scaled_dot_product_attention in user code, not only in nn modules."""

    class SelfAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4, dtype=torch.float64)

        def forward(self, x):
            q = self.proj(x)[:, None, None, :].expand(-1, 1, 3, -1)
            return torch.nn.functional.scaled_dot_product_attention(q, q, q)[:, 0, 0, :]

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.randn(6, 4, generator=gen, dtype=torch.float64)
    problem = flows.Problem(SelfAttention(), "mse", (x, y))
    v = torch.randn(problem.num_params, generator=gen, dtype=torch.float64)
    jv = torch.func.jvp(problem.grad, (problem.theta0,), (v,))[1]  # fails inside the fused kernel without the probe
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        hessian = torch.func.jacrev(torch.func.grad(problem.loss))(problem.theta0)
    torch.testing.assert_close(jv, hessian @ v, rtol=1e-9, atol=1e-11)


def test_hessian_and_layerwise_jacobian_through_layer_norm_are_right():
    """PyTorch 2.13's fused layer norm gets forward mode over a batched reverse pass wrong (torch.func.hessian is
    jacfwd(jacrev)); flows evaluates it in composite form, so torch.func.hessian(problem.loss) equals reverse over
    reverse, the dense sharpness is its top eigenvalue, and a JVP of the Layerwise direction (LayerNorm rows pulled
    by batched vjps) equals central differences."""
    problem = _transformer_problem()
    theta = problem.theta0
    reference = torch.func.jacrev(problem.grad)(theta)
    hessian = torch.func.hessian(problem.loss)(theta)
    torch.testing.assert_close(hessian, reference, rtol=1e-9, atol=1e-11)
    top = float(torch.linalg.eigvalsh(0.5 * (reference + reference.T))[-1])
    sharp = flows.contraction.sharpness(problem, theta, method="dense")
    assert abs(float(sharp.sharpness[0]) - top) <= 1e-9 * abs(top)

    metric = flows.metrics.Layerwise(problem, mu=0.1)
    v = torch.randn(theta.shape, generator=torch.Generator().manual_seed(3), dtype=theta.dtype)
    jv = torch.func.jvp(metric.natural_direction, (theta,), (v,))[1]
    h = 1e-5
    central = (metric.natural_direction(theta + h * v) - metric.natural_direction(theta - h * v)) / (2 * h)
    torch.testing.assert_close(jv, central, rtol=1e-6, atol=1e-6 * float(central.abs().max()))
