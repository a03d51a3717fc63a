"""Data sets with train/test splits, all offline: scikit-learn's digits (shipped inside scikit-learn), MNIST-1D
(generated locally by the ``mnist1d`` package and cached), teacher–student regression and small synthetic problems.

Nothing here touches the network. Each data set's docstring states its source, size and licence.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flows._io import atomic_path

SPLITS = (None, "train", "test")


def _check_split(split) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be None (all samples), 'train' or 'test', got {split!r}")


def digits(n: int | None = None, *, split: str | None = None, test_fraction: float = 0.25, seed: int = 0,
           images: bool = False, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1 797 8×8 handwritten digits of scikit-learn (bundled, no download), pixels scaled to [0, 1].

    Source: the UCI optical recognition of handwritten digits test set (Alpaydin & Kaynak 1998) as shipped by
    scikit-learn (``sklearn.datasets.load_digits``, BSD-3-Clause package; the data are CC BY 4.0).

    Returns ``(inputs, labels)``: inputs (n, 64) of ``dtype`` — or (n, 1, 8, 8) with ``images=True`` — and
    integer labels (n,) in 0…9.

    Args:
        n: a fixed random subset of n samples (of the split), drawn with ``seed``.
        split: None for all 1 797 samples; ``"train"`` / ``"test"`` for a fixed stratified split (every class
            keeps its share; ``test_fraction`` of each class, rounded, goes to the test set). The split does not
            depend on ``seed``, so the test set is the same whatever subset is trained on: 1 347 train and 450
            test samples at the default fraction.
    """
    from sklearn.datasets import load_digits

    _check_split(split)
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    x, y = load_digits(return_X_y=True)
    inputs = torch.as_tensor(x, dtype=dtype) / 16.0
    labels = torch.as_tensor(y, dtype=torch.long)
    if split is not None:
        inputs, labels = _stratified(inputs, labels, split, test_fraction)
    if n is not None:
        if not 1 <= n <= len(labels):
            raise ValueError(f"n must be between 1 and {len(labels)}, got {n}")
        idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:n]
        inputs, labels = inputs[idx], labels[idx]
    if images:
        inputs = inputs.reshape(-1, 1, 8, 8)
    return inputs, labels


def _stratified(inputs, labels, split, test_fraction, split_seed: int = 0):
    """A fixed stratified split: within each class a seeded permutation, the first round(f·n_c) are test."""
    gen = torch.Generator().manual_seed(split_seed)
    test = torch.zeros(len(labels), dtype=torch.bool)
    for c in torch.unique(labels):
        members = torch.nonzero(labels == c).reshape(-1)
        members = members[torch.randperm(len(members), generator=gen)]
        test[members[:round(test_fraction * len(members))]] = True
    keep = test if split == "test" else ~test
    return inputs[keep], labels[keep]


def cache_dir() -> Path:
    """Where generated data sets are cached: ``$FLOWS_CACHE_DIR``, else ``~/.cache/riemannian-flows``."""
    return Path(os.environ.get("FLOWS_CACHE_DIR") or Path.home() / ".cache" / "riemannian-flows").expanduser()


def mnist1d(*, split: str = "train", seed: int = 42, channel: bool = False, dtype=torch.float64,
            cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST-1D (Greydanus & Kobak, "Scaling down deep learning with MNIST-1D", ICML 2024), generated offline.

    The ``mnist1d`` package (Apache-2.0) builds the data procedurally from ten 1-D digit templates (padding,
    shear, translation, correlated and i.i.d. noise) with its default arguments and ``seed`` (42 is the
    package's default, the published data set): 5 000 sequences of length 40, 4 000 train and 1 000 test,
    ten classes, standardised to mean 0 and standard deviation 1. Nothing is downloaded: the package's
    ``make_dataset`` runs locally (about 2 s) and the result is cached under :func:`cache_dir` (written
    atomically) for later calls. The global ``random``/``numpy`` generators the package seeds are restored.

    Returns ``(inputs, labels)``: inputs (n, 40), or (n, 1, 40) with ``channel=True`` (for Conv1d), of
    ``dtype``; integer labels (n,) in 0…9.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    path = cache_dir() / f"mnist1d-seed{int(seed)}.npz"
    data = None
    if cache and path.exists():
        try:
            with np.load(path, allow_pickle=False) as stored:
                data = {key: stored[key] for key in ("x", "y", "x_test", "y_test")}
        except (OSError, ValueError, KeyError):
            data = None  # a damaged cache file is regenerated
    if data is None:
        data = _generate_mnist1d(int(seed))
        if cache:
            try:
                with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                    np.savez(fh, **data)
            except OSError as exc:  # a read-only home is no reason to refuse the data
                warnings.warn(f"could not cache MNIST-1D at {path}: {exc}", stacklevel=2)
    x, y = (data["x"], data["y"]) if split == "train" else (data["x_test"], data["y_test"])
    inputs = torch.as_tensor(np.asarray(x), dtype=dtype)
    if channel:
        inputs = inputs[:, None, :]
    return inputs, torch.as_tensor(np.asarray(y), dtype=torch.long)


def _generate_mnist1d(seed: int) -> dict[str, np.ndarray]:
    import random

    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002 - the package seeds the legacy global
    try:
        made = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002
    return {key: np.asarray(made[key]) for key in ("x", "y", "x_test", "y_test")}


def mlp(sizes: list[int] | tuple[int, ...], *, activation: type[nn.Module] = nn.Tanh, seed: int = 0,
        dtype=torch.float64) -> nn.Sequential:
    """A fully connected network ``sizes[0] → … → sizes[-1]`` with ``activation`` between layers.

    Weights use torch's default initialisation under a fixed seed, so one seed gives one θ₀.
    """
    if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
        raise ValueError(f"sizes must list at least two positive layer widths, got {list(sizes)}")
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(int(fan_in), int(fan_out), dtype=dtype))
            if i < len(sizes) - 2:
                layers.append(activation())
        return nn.Sequential(*layers)
    finally:
        torch.random.set_rng_state(gen_state)


class ParameterModel(nn.Module):
    """A "model" whose output is its own parameter vector θ (one row per input): turns any loss of θ into a
    :class:`flows.Problem`."""

    def __init__(self, theta0):
        super().__init__()
        self.theta = nn.Parameter(torch.as_tensor(theta0, dtype=torch.float64).reshape(-1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.theta.expand(x.shape[0], -1)


def function_problem(loss_of_theta, theta0, *, name: str | None = None, dtype=torch.float64):
    """The problem L(θ) = ``loss_of_theta(θ)`` for any differentiable function of a flat vector (2-D loss
    landscapes, synthetic test functions). ``loss_of_theta`` must be written with torch operations."""
    from flows.problem import Problem

    def loss(output, target):
        return loss_of_theta(output[0])

    loss.__name__ = name or getattr(loss_of_theta, "__name__", "function")
    theta0 = torch.as_tensor(theta0, dtype=torch.float64).reshape(-1)
    return Problem(ParameterModel(theta0), loss, (torch.zeros(1, 1), torch.zeros(1, 1)), dtype=dtype)


def quadratic(A, theta0, *, dtype=torch.float64):
    """The problem L(θ) = ½ θᵀAθ (A symmetric), whose gradient flows have closed forms (MATH.md §1).

    Under a constant metric M the flow is θ(t) = exp(−M⁻¹A t) θ₀.
    """
    A = torch.as_tensor(A, dtype=torch.float64)

    def quadratic_loss(theta):
        return 0.5 * theta @ A.to(theta) @ theta

    return function_problem(quadratic_loss, theta0, dtype=dtype)


def teacher_student(n: int = 512, sizes=(10, 20, 5), *, noise: float = 0.0, seed: int = 0, split: str | None = None,
                    n_test: int | None = None, dtype=torch.float64):
    """Regression data from a random teacher network: inputs x ~ N(0, I), targets = teacher(x) + noise·ε.

    The teacher is ``mlp(sizes, seed=seed + 1)`` (tanh hidden layers, torch's default initialisation) with every
    weight and bias doubled, so that it works outside its linear regime; ε ~ N(0, I).

    Returns (inputs, targets) of shapes (n, sizes[0]) and (n, sizes[-1]): the training set for ``split`` None
    or ``"train"``; with ``split="test"``, ``n_test`` samples (default n) drawn independently of the training
    draw from the same teacher and noise level (the teacher depends on ``seed`` only, never on the split).
    Synthetic (generated here): no source or licence.
    """
    _check_split(split)
    gen = torch.Generator().manual_seed(seed)
    teacher = mlp(sizes, seed=seed + 1, dtype=dtype)
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(2.0)  # a teacher well outside the linear regime
        x = torch.randn(n, sizes[0], generator=gen, dtype=dtype)
        y = teacher(x) + noise * torch.randn(n, sizes[-1], generator=gen, dtype=dtype)
        if split == "test":
            test_gen = torch.Generator().manual_seed(seed + 1_000_003)  # independent of the training draw
            m = n if n_test is None else int(n_test)
            if m < 1:
                raise ValueError(f"n_test must be at least 1, got {n_test}")
            x = torch.randn(m, sizes[0], generator=test_gen, dtype=dtype)
            y = teacher(x) + noise * torch.randn(m, sizes[-1], generator=test_gen, dtype=dtype)
    return x, y


def cnn(channels: int = 16, *, classes: int = 10, seed: int = 0, dtype=torch.float64) -> nn.Sequential:
    """A small CNN for the 8×8 digit images (``digits(images=True)``): conv 1→c (3×3, pad 1) → tanh → conv c→c
    (3×3, pad 1, stride 2) → tanh → flatten → Linear(16c → classes). torch's default initialisation under
    ``seed``. The architecture of ``benchmarks/metrics.py`` and ``examples/cnn_digits.py``."""
    if int(channels) < 1:
        raise ValueError(f"channels must be at least 1, got {channels}")
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return nn.Sequential(nn.Conv2d(1, channels, 3, padding=1, dtype=dtype), nn.Tanh(),
                             nn.Conv2d(channels, channels, 3, padding=1, stride=2, dtype=dtype), nn.Tanh(),
                             nn.Flatten(), nn.Linear(channels * 16, classes, dtype=dtype))
    finally:
        torch.random.set_rng_state(gen_state)


def token_sum(n: int = 512, *, length: int = 8, vocab: int = 16, modulus: int = 10, split: str | None = None,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic sequence task: ``length`` tokens drawn uniformly from 0…vocab−1, label = their sum modulo
    ``modulus``. Every token matters and their order does not, so attention has to pool the whole sequence.

    Returns (tokens (n, length) long, labels (n,) long). ``split="test"`` draws n fresh sequences from a stream
    independent of the training draw (same seed), so train and test never share a draw by construction (a
    sequence may still repeat by chance when vocab**length is small). Synthetic (generated here): no licence.
    """
    _check_split(split)
    for name, value in (("n", n), ("length", length), ("vocab", vocab), ("modulus", modulus)):
        if int(value) < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    gen = torch.Generator().manual_seed(seed + (1_000_003 if split == "test" else 0))
    tokens = torch.randint(0, vocab, (n, length), generator=gen)
    return tokens, tokens.sum(1) % modulus


class Transformer(nn.Module):
    """One pre-norm transformer block on token sequences, mean-pooled into class logits:

        h = embed(tokens) + positions;  h ← h + attention(LayerNorm(h));  h ← h + down(tanh(up(LayerNorm(h))))
        logits = head(mean over positions of h)

    Embedding, learned positions, ``nn.MultiheadAttention`` (``heads`` heads), two LayerNorms, an MLP
    width → hidden → width and a linear head — every module family the layerwise metric has a path for.
    """

    def __init__(self, vocab: int = 16, length: int = 8, width: int = 16, heads: int = 2, hidden: int = 32,
                 classes: int = 10, *, seed: int = 0, dtype=torch.float64):
        super().__init__()
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            self.embed = nn.Embedding(vocab, width, dtype=dtype)
            self.position = nn.Parameter(0.1 * torch.randn(length, width, dtype=dtype))
            self.norm1 = nn.LayerNorm(width, dtype=dtype)
            self.attn = nn.MultiheadAttention(width, heads, batch_first=True, dtype=dtype)
            self.norm2 = nn.LayerNorm(width, dtype=dtype)
            self.up = nn.Linear(width, hidden, dtype=dtype)
            self.down = nn.Linear(hidden, width, dtype=dtype)
            self.head = nn.Linear(width, classes, dtype=dtype)
        finally:
            torch.random.set_rng_state(gen_state)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.position
        a = self.norm1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.down(torch.tanh(self.up(self.norm2(h))))
        return self.head(h.mean(dim=1))
