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
