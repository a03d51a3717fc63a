"""The metric interface and the constant metrics (MATH.md §1–2).

A metric is an SPD matrix field G(θ). Rules only need ``solve(θ, v) = G(θ)⁻¹ v``; ``matrix(θ)`` gives the dense
G(θ) for small N (tests, plots, action integrals). Every ``solve`` and ``apply`` accepts leading batch
dimensions: θ and v of shape (..., N), one metric per batch member.
"""

from __future__ import annotations

import abc

import torch


class Metric(abc.ABC):
    """An SPD metric G(θ) on parameter space.

    ``depends_on_theta`` says whether G moves with θ: contraction rates of a moving metric include Ġ along the flow
    (:func:`flows.contraction.rate`); for a constant metric freezing it is exact.
    """

    depends_on_theta: bool = True

    @abc.abstractmethod
    def solve(self, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """G(θ)⁻¹ v."""

    @abc.abstractmethod
    def matrix(self, theta: torch.Tensor) -> torch.Tensor:
        """Dense G(θ), shape (N, N) (θ of shape (N,)). Memory O(N²): for small N."""

    def apply(self, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """G(θ) v. The default forms the dense matrix; subclasses override it with a cheaper product."""
        if theta.ndim > 1:
            return torch.stack([self.apply(th, vv) for th, vv in zip(theta, v)])
        return self.matrix(theta) @ v

    def describe(self) -> dict:
        """A JSON-serialisable description (stored in trajectory metadata)."""
        return {"name": type(self).__name__}

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in self.describe().items() if k != "name")
        return f"{type(self).__name__}({fields})"


def _check_length(v: torch.Tensor, n: int, what: str) -> None:
    if v.shape[-1] != n:
        raise ValueError(f"{what} has length {v.shape[-1]} but the metric acts on vectors of length {n}")


def _positive_float(value, name: str) -> float:
    value = float(value)
    if not (value > 0 and value < float("inf")):
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return value


class Euclidean(Metric):
    """G = scale · I: plain gradient flow (time rescaled by 1/scale). Cost O(N)."""

    depends_on_theta = False

    def __init__(self, scale: float = 1.0):
        self.scale = _positive_float(scale, "scale")

    def solve(self, theta, v):
        return v / self.scale

    def apply(self, theta, v):
        return v * self.scale

    def matrix(self, theta):
        n = theta.shape[-1]
        return self.scale * torch.eye(n, dtype=theta.dtype, device=theta.device)

    def describe(self):
        return {"name": "Euclidean", "scale": self.scale}


class Diagonal(Metric):
    """G = diag(weights), weights > 0: a fixed per-parameter preconditioner. Cost O(N)."""

    depends_on_theta = False

    def __init__(self, weights):
        weights = torch.as_tensor(weights)
        if weights.ndim != 1:
            raise ValueError(f"weights must be a vector, got shape {tuple(weights.shape)}")
        bad = ~(torch.isfinite(weights) & (weights > 0))
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(f"weights must be positive and finite; weights[{i}] = {weights[i].item()}")
        self.weights = weights

    def _w(self, v):
        _check_length(v, self.weights.numel(), "v")
        return self.weights.to(v.device, v.dtype)

    def solve(self, theta, v):
        return v / self._w(v)

    def apply(self, theta, v):
        return v * self._w(v)

    def matrix(self, theta):
        return torch.diag(self._w(theta))

    def describe(self):
        return {"name": "Diagonal", "size": self.weights.numel()}


class Constant(Metric):
    """A fixed SPD matrix M. Validated at construction; solves by a cached Cholesky factor, O(N²) each."""

    depends_on_theta = False

    def __init__(self, matrix):
        m = torch.as_tensor(matrix)
        if not m.is_floating_point():
            m = m.to(torch.float64)
        if m.ndim != 2 or m.shape[0] != m.shape[1]:
            raise ValueError(f"matrix must be square, got shape {tuple(m.shape)}")
        asym = (m - m.T).abs().max().item()
        scale = m.abs().max().item()
        if not asym <= 1e-12 * max(scale, 1.0) * m.shape[0]:
            raise ValueError(f"matrix must be symmetric; max |M - Mᵀ| = {asym:.3g}")
        chol, info = torch.linalg.cholesky_ex(m)
        if info.item() != 0:
            lam_min = torch.linalg.eigvalsh(m)[0].item()
            raise ValueError(f"matrix must be positive definite; its smallest eigenvalue is {lam_min:.3g}")
        self.M = m
        self._chol = chol
        self._cache: dict = {}

    def _factor(self, v: torch.Tensor) -> torch.Tensor:
        _check_length(v, self.M.shape[0], "v")
        key = (v.device, v.dtype)
        if key not in self._cache:
            self._cache[key] = self._chol.to(v.device, v.dtype)
        return self._cache[key]

    def solve(self, theta, v):
        chol = self._factor(v)
        flat = v.reshape(-1, v.shape[-1]).T
        return torch.cholesky_solve(flat, chol).T.reshape(v.shape)

    def apply(self, theta, v):
        return v @ self.M.to(v.device, v.dtype)

    def matrix(self, theta):
        return self.M.to(theta.device, theta.dtype)

    def describe(self):
        return {"name": "Constant", "size": self.M.shape[0]}


def batched(fn, theta: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
    """Apply ``fn(θ, *args)`` written for one θ of shape (N,) to θ of shape (..., N) via torch.func.vmap."""
    if theta.ndim == 1:
        return fn(theta, *args)
    n = theta.shape[-1]
    flat = [a.reshape(-1, n) for a in (theta, *args)]
    return torch.func.vmap(fn)(*flat).reshape(theta.shape)


def block_diagonal_matrix(n: int, blocks, like: torch.Tensor) -> torch.Tensor:
    """The dense N × N matrix with the given (slice, block) pairs on its diagonal and zeros elsewhere."""
    out = torch.zeros(n, n, dtype=like.dtype, device=like.device)
    for sl, block in blocks:
        out[sl, sl] = block
    return out
