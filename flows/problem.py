"""A learning problem: a model, a loss and a data set, seen as functions of one flat parameter vector θ.

    L(θ) = loss(model(inputs; θ), targets)                      (full batch)

The model is never mutated: its parameters are copied once into the flat vector ``theta0`` and every
evaluation goes through :func:`torch.func.functional_call`, so ``loss`` and ``grad`` are pure functions of θ
and batch over an ensemble of parameter vectors with :func:`torch.func.vmap`.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, grad_and_value, vjp, vmap

from flows.linalg import KernelProbe, differentiable_kernels, softmax

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error  L = (1/B) Σ_b ½‖y_b − t_b‖²  (MATH.md §2.1).

    This is ``C/2`` times torch's ``MSELoss()`` (which averages over all B·C entries); the factor makes the
    output-space Gauss–Newton metric exactly I/B per sample.
    """
    diff = output - target
    return 0.5 * (diff * diff).sum() / output.shape[0]


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy averaged over the batch, ``torch.nn.functional.cross_entropy``."""
    return F.cross_entropy(output, target)


LOSSES: dict[str, LossFn] = {"mse": mse, "cross_entropy": cross_entropy}


def output_gradient(loss_fn: LossFn, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """∇_y L(y, t): the costate at the network output (MATH.md §2.4), the start of every backward sweep.

    For the built-in losses in closed form, in plain tensor operations (so it composes with torch.func transforms
    like any other op, and skips a transformed backward pass, ≈ 0.3 ms per call on CPU):

        mse:            ∇_y L = (y − t)/B
        cross_entropy:  ∇_y L = (softmax(y) − onehot(t))/B      (class-index targets, y of shape (B, C))

    Any other loss (or other target forms) by ``torch.func.grad``. Cost O(B·C).
    """
    if loss_fn is mse:
        return (output - target) / output.shape[0]
    if loss_fn is cross_entropy and output.ndim == 2 and not target.is_floating_point() and target.ndim == 1:
        p = softmax(output)
        return (p - F.one_hot(target, output.shape[1]).to(p.dtype)) / output.shape[0]
    return grad(lambda out: loss_fn(out, target))(output)


@dataclass(frozen=True)
class Block:
    """The parameters of one module, a contiguous slice ``start:stop`` of θ."""

    name: str
    start: int
    stop: int
    param_names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @property
    def slice(self) -> slice:
        return slice(self.start, self.stop)

    @property
    def size(self) -> int:
        return self.stop - self.start


def _as_batch_pair(data, what: str = "data") -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) as tensors with one batch dimension in front, finite, and of equal batch size."""
    try:
        inputs, targets = data
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be a pair (inputs, targets), got {type(data).__name__}") from exc
    pair = []
    for name, value in (("inputs", inputs), ("targets", targets)):
        try:
            tensor = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{what}: {name} must be a tensor or an array of numbers, got "
                            f"{type(value).__name__} ({exc})") from None
        if tensor.ndim == 0:
            raise ValueError(f"{what}: {name} need a batch dimension in front, got a scalar")
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{what}: {name} contain {bad} non-finite value(s) (NaN or inf)")
        pair.append(tensor)
    inputs, targets = pair
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"{what}: inputs and targets must have the same batch size, got {inputs.shape[0]} inputs "
            f"and {targets.shape[0]} targets"
        )
    return inputs, targets


def _dropout_rate(module: nn.Module) -> float:
    p = getattr(module, "dropout", None) if isinstance(module, nn.MultiheadAttention) else getattr(module, "p", 0.0)
    return float(p or 0.0)


def random_in_training_mode(model: nn.Module) -> list[str]:
    """Qualified names of the modules whose forward depends on ``training`` in a way a gradient flow cannot
    have: dropout (random, so ∇L is not a function of θ) and batch normalisation (couples the samples of a
    batch and updates running statistics)."""
    found = []
    for name, module in model.named_modules():
        if not module.training:
            continue
        stochastic = isinstance(module, nn.modules.dropout._DropoutNd | nn.MultiheadAttention) and \
            _dropout_rate(module) > 0
        if stochastic or isinstance(module, nn.modules.batchnorm._BatchNorm):
            found.append(f"{name or '<model>'} ({type(module).__name__})")
    return found


def shared_parameters(model: nn.Module) -> dict[str, list[str]]:
    """Parameters owned by more than one module (tied weights, or one module registered under two names): the
    first name of each such parameter mapped to all of its names. Empty for a model without sharing."""
    owners: dict[int, list[str]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for local, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append(f"{prefix}.{local}" if prefix else local)
    return {names[0]: names for names in owners.values() if len(names) > 1}


def _matches(name: str, pattern: str) -> bool:
    """A parameter name matches a pattern that is its own name, the name of a module above it, or a glob."""
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


class Problem:
    """A full-batch learning problem as a function of the flat parameter vector θ ∈ R^N.

    Args:
        model: any ``nn.Module``; its parameters (in ``named_parameters`` order) make up θ.
        loss: ``"mse"`` (:func:`mse`), ``"cross_entropy"`` (:func:`cross_entropy`) or a callable
            ``(output, target) -> scalar``.
        data: a pair ``(inputs, targets)``, used as one full batch.
        dtype: floating dtype of θ and of the computation (float64 by default).
        device: where everything runs; by default the device of the model's parameters.
        eval_data: named held-out sets ``{"test": (inputs, targets), …}`` (any number). They never enter
            L(θ) or ∇L(θ); :meth:`evaluate` measures the loss — and, for classification, the accuracy — on
            each, with forward passes only, and simulations record them at every output time.
        blocks: how θ is split into blocks (see :meth:`group_blocks`); default one block per module that owns
            parameters. A model whose parameters are shared between modules (tied weights) is refused unless the
            blocks are given, because "one block per module" has no meaning for it.

    Attributes:
        theta0: the model's current parameters as one flat vector (a copy).
        blocks: one :class:`Block` per module that owns parameters (or per group of ``blocks``), in θ order.
        num_params: N.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: str | LossFn,
        data,
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
        eval_data=None,
        blocks=None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        training = random_in_training_mode(model)
        if training:
            raise ValueError(
                f"the model has modules in training mode whose output is random or couples samples: "
                f"{', '.join(training)}. A gradient flow needs L(θ) to be a deterministic function of θ; call "
                "model.eval() first (dropout off, batch norm on its running statistics)")
        params = dict(model.named_parameters())
        if not params:
            raise ValueError(f"model {type(model).__name__} has no parameters")
        if device is None:
            device = next(iter(params.values())).device
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model
        if isinstance(loss, str):
            if loss not in LOSSES:
                raise ValueError(f"unknown loss {loss!r}; choose one of {sorted(LOSSES)} or pass a callable")
            self.loss_name, self.loss_fn = loss, LOSSES[loss]
        elif callable(loss):
            self.loss_name, self.loss_fn = getattr(loss, "__name__", type(loss).__name__), loss
        else:
            raise TypeError(f"loss must be a name or a callable, got {type(loss).__name__}")

        inputs, targets = _as_batch_pair(data)
        self.inputs = self._to_device(inputs)
        self.targets = self._to_device(targets)
        self.buffers = {name: self._to_device(b.detach()) for name, b in model.named_buffers()}

        self._names = tuple(params)
        self._shapes = tuple(p.shape for p in params.values())
        self._numels = tuple(p.numel() for p in params.values())
        self.theta0 = torch.cat([p.detach().reshape(-1) for p in params.values()]).to(self.device, dtype)
        self.num_params = int(self.theta0.numel())
        shared = shared_parameters(model)
        if shared and blocks is None:
            listing = "; ".join(" = ".join(names) for names in shared.values())
            raise ValueError(f"the model shares parameters between modules ({listing}), so one block per module is "
                             "not defined; pass blocks= to Problem (names or name patterns per block)")
        self.blocks = self._make_blocks() if blocks is None else self.group_blocks(blocks)
        if self.batch_size == 0:
            raise ValueError("the training data is empty (0 samples)")
        self._check_labels(self.targets, "the training data")
        self._kernels = True  # evaluations run differentiable_kernels unless the trial evaluation sees no kernel
        self._check_loss_at_theta0(inputs)
        self.eval_data = self._eval_sets(eval_data)

    def _eval_sets(self, eval_data) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if eval_data is None:
            return {}
        if not isinstance(eval_data, Mapping):
            raise TypeError(f"eval_data must map names to (inputs, targets) pairs, got {type(eval_data).__name__}")
        sets = {}
        for name, pair in eval_data.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"eval_data names must be non-empty strings, got {name!r}")
            inputs, targets = _as_batch_pair(pair, f"eval set {name!r}")
            if inputs.shape[1:] != self.inputs.shape[1:]:
                raise ValueError(f"eval set {name!r} has inputs of shape {tuple(inputs.shape[1:])} per sample, "
                                 f"the training data {tuple(self.inputs.shape[1:])}")
            if targets.shape[1:] != self.targets.shape[1:] or targets.dtype.is_floating_point != \
                    self.targets.dtype.is_floating_point:
                raise ValueError(f"eval set {name!r} has targets of shape {tuple(targets.shape[1:])} and dtype "
                                 f"{targets.dtype} per sample, the training data {tuple(self.targets.shape[1:])} "
                                 f"and {self.targets.dtype}")
            if inputs.shape[0] == 0:
                raise ValueError(f"eval set {name!r} is empty (0 samples)")
            self._check_labels(targets, f"eval set {name!r}")
            sets[name] = (self._to_device(inputs), self._to_device(targets))
        return sets

    def _check_loss_at_theta0(self, raw_inputs: torch.Tensor) -> None:
        """One trial evaluation of L(θ₀) on the training data, so that a model that cannot run on the inputs, or a
        loss that is not a finite scalar, is reported here by name rather than deep inside a solver."""
        buffers = {name: b.clone() for name, b in self.buffers.items()}
        try:
            with torch.no_grad(), KernelProbe() as probe:
                outputs = functional_call(self.model, (self.unflatten(self.theta0), buffers), (self.inputs,))
                value = self.loss_fn(outputs, self.targets)
            self._kernels = probe.seen
        except (RuntimeError, IndexError, TypeError, ValueError) as exc:
            hint = ""
            if not raw_inputs.is_floating_point():
                hint = (f" The inputs have dtype {raw_inputs.dtype}: a model of Linear or Conv layers needs floating "
                        "inputs (integer inputs suit token models that start with nn.Embedding).")
            raise ValueError(f"the model and loss cannot be evaluated on the training data at θ₀ (inputs "
                             f"{tuple(self.inputs.shape)} {self.inputs.dtype}, targets {tuple(self.targets.shape)} "
                             f"{self.targets.dtype}): {type(exc).__name__}: {exc}.{hint}") from None
        if not isinstance(value, torch.Tensor) or value.ndim != 0:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"the loss {self.loss_name!r} must return a scalar (a mean over the batch), got {shape}")
        if not math.isfinite(float(value)):
            raise ValueError(f"the loss {self.loss_name!r} is {float(value)} at θ₀ on the training data")

    def _check_labels(self, targets: torch.Tensor, where: str) -> None:
        """Class labels of a classification problem must lie in 0…C−1, C the width of the model's output
        (read from one forward pass of two training samples at θ₀, on copies of the buffers so that running
        statistics are left untouched; a model that cannot run on two samples skips the check)."""
        if not self.is_classification or targets.ndim != 1 or targets.numel() == 0:
            return
        buffers = {name: b.clone() for name, b in self.buffers.items()}
        try:
            with torch.no_grad():
                out = functional_call(self.model, (self.unflatten(self.theta0), buffers), (self.inputs[:2],))
        except (RuntimeError, ValueError):
            return
        if not isinstance(out, torch.Tensor) or out.ndim != 2:
            return
        classes = int(out.shape[-1])
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= classes:
            bad = low if low < 0 else high
            raise ValueError(f"{where} has class label {bad}, outside 0…{classes - 1} (the model has {classes} "
                             "outputs)")

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        return x.to(self.dtype) if x.is_floating_point() else x

    def _make_blocks(self) -> tuple[Block, ...]:
        blocks: list[Block] = []
        offset = 0
        for name, shape, numel in zip(self._names, self._shapes, self._numels):
            owner = name.rpartition(".")[0] or name
            if blocks and blocks[-1].name == owner:
                last = blocks[-1]
                blocks[-1] = Block(owner, last.start, offset + numel, (*last.param_names, name),
                                   (*last.shapes, shape))
            else:
                blocks.append(Block(owner, offset, offset + numel, (name,), (shape,)))
            offset += numel
        return tuple(blocks)

    def group_blocks(self, spec) -> tuple[Block, ...]:
        """Blocks of θ from a specification, each a contiguous run of whole parameters, together tiling θ.

        ``spec`` is a list with one entry per block — a name pattern, or a list of name patterns — or a mapping
        ``{block name: pattern or list of patterns}``. A pattern matches a parameter whose name it is, a module
        above it (``"layer1"`` matches ``"layer1.0.weight"``) or a glob (``"*.bias"``). Every parameter must be
        matched by exactly one block. :class:`Block` objects (``problem.blocks``) are accepted as they are.
        """
        if isinstance(spec, Mapping):
            entries = list(spec.items())
        elif isinstance(spec, (list, tuple)) and spec:
            if all(isinstance(b, Block) for b in spec):
                entries = [(b.name, list(b.param_names)) for b in spec]
            else:
                entries = [(e if isinstance(e, str) else "|".join(e), e) for e in spec]
        else:
            raise TypeError(f"blocks must be a non-empty list of name patterns (or lists of them) or a mapping from "
                            f"block names to patterns, got {spec!r}")
        owner: dict[str, str] = {}
        for block_name, patterns in entries:
            patterns = [patterns] if isinstance(patterns, str) else list(patterns)
            if not patterns or not all(isinstance(p, str) for p in patterns):
                raise TypeError(f"block {block_name!r}: patterns must be strings, got {patterns!r}")
            hits = [n for n in self._names if any(_matches(n, p) for p in patterns)]
            if not hits:
                raise ValueError(f"block {block_name!r} ({patterns}) matches no parameter; the parameters are "
                                 f"{list(self._names)}")
            for n in hits:
                if n in owner:
                    raise ValueError(f"parameter {n!r} is matched by two blocks, {owner[n]!r} and {block_name!r}")
                owner[n] = block_name
        missing = [n for n in self._names if n not in owner]
        if missing:
            raise ValueError(f"parameters {missing} belong to no block")
        blocks: list[Block] = []
        offset, seen = 0, set()
        for name, shape, numel in zip(self._names, self._shapes, self._numels):
            block_name = owner[name]
            if blocks and blocks[-1].name == block_name:
                last = blocks[-1]
                blocks[-1] = Block(block_name, last.start, offset + numel, (*last.param_names, name),
                                   (*last.shapes, shape))
            elif block_name in seen:
                raise ValueError(f"block {block_name!r} is not contiguous in θ: parameter {name!r} follows "
                                 f"{blocks[-1].param_names[-1]!r} of block {blocks[-1].name!r}")
            else:
                seen.add(block_name)
                blocks.append(Block(block_name, offset, offset + numel, (name,), (shape,)))
            offset += numel
        return tuple(blocks)

    def __repr__(self) -> str:
        return (f"Problem({type(self.model).__name__}, loss={self.loss_name!r}, batch={self.batch_size}, "
                f"N={self.num_params}, dtype={self.dtype})")

    @property
    def batch_size(self) -> int:
        return int(self.inputs.shape[0])

    # -- flat view -------------------------------------------------------------------------------
    def _check(self, theta: torch.Tensor) -> None:
        if theta.ndim == 0:
            raise ValueError(f"theta must have shape (N,) or (..., N) with N = {self.num_params}, got a scalar")
        if theta.shape[-1] != self.num_params:
            raise ValueError(
                f"theta has length {theta.shape[-1]} but the problem has {self.num_params} parameters"
            )
        if theta.dtype != self.dtype:
            raise ValueError(f"theta has dtype {theta.dtype} but the problem's parameters and data are {self.dtype}; "
                             f"convert it with theta.to({self.dtype})")

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of θ (shape ``(..., N)``) as the model's named parameters, batch dimensions in front."""
        self._check(theta)
        batch = theta.shape[:-1]
        pieces = torch.split(theta, self._numels, dim=-1)
        return {n: p.reshape(*batch, *s) for n, p, s in zip(self._names, pieces, self._shapes)}

    def flatten(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`unflatten` for one parameter set."""
        return torch.cat([params[n].reshape(-1) for n in self._names])

    # -- pure functions of one θ (vmap-able) ----------------------------------------------------
    def _outputs(self, theta: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        params = self.unflatten(theta)
        if not self._kernels:
            return functional_call(self.model, (params, self.buffers), (inputs,))
        with differentiable_kernels():  # every derivative through attention and normalisation right, too
            return functional_call(self.model, (params, self.buffers), (inputs,))

    def _loss(self, theta: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self._outputs(theta, self.inputs), self.targets)

    def _subset_loss(self, theta: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self._outputs(theta, inputs), targets)

    def _sample_loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self._outputs(theta, x.unsqueeze(0)), y.unsqueeze(0))

    def _subset(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Training inputs and targets at ``indices`` (all of them for ``None``), checked."""
        if indices is None:
            return self.inputs, self.targets
        idx = torch.as_tensor(indices, device=self.device)
        if idx.numel() == 0:
            raise ValueError("indices is empty: a minibatch needs at least one sample")
        if idx.dtype == torch.bool or idx.is_floating_point() or idx.ndim != 1:
            raise TypeError(f"indices must be a 1-D sequence of integer sample indices, got dtype {idx.dtype} and "
                            f"shape {tuple(idx.shape)}")
        low, high = int(idx.min()), int(idx.max())
        if low < 0 or high >= self.batch_size:
            bad = low if low < 0 else high
            raise ValueError(f"sample index {bad} is outside 0…{self.batch_size - 1} (the training data has "
                             f"{self.batch_size} samples)")
        return self.inputs[idx], self.targets[idx]

    def _batched(self, fn, theta: torch.Tensor):
        self._check(theta)
        if theta.ndim == 1:
            return fn(theta)
        flat = theta.reshape(-1, self.num_params)
        out = vmap(fn)(flat)
        if isinstance(out, tuple):
            return tuple(o.reshape(*theta.shape[:-1], *o.shape[1:]) for o in out)
        return out.reshape(*theta.shape[:-1], *out.shape[1:])

    # -- public evaluations ---------------------------------------------------------------------
    def outputs(self, theta: torch.Tensor, inputs: torch.Tensor | None = None) -> torch.Tensor:
        """Network outputs y(θ) on ``inputs`` (the problem's inputs by default); θ of shape (N,) or (E, N)."""
        x = self.inputs if inputs is None else self._to_device(torch.as_tensor(inputs))
        return self._batched(lambda th: self._outputs(th, x), theta)

    def loss(self, theta: torch.Tensor, indices=None) -> torch.Tensor:
        """L(θ); θ of shape (N,) gives a scalar, (E, N) gives E losses (vmap). Cost: one forward pass.

        ``indices`` (a 1-D sequence of training-sample indices) evaluates the minibatch loss
        L_B(θ) = loss(model(inputs[B]; θ), targets[B]) instead of the full-batch one."""
        if indices is None:
            return self._batched(self._loss, theta)
        x, y = self._subset(indices)
        return self._batched(lambda th: self._subset_loss(th, x, y), theta)

    def grad(self, theta: torch.Tensor, indices=None) -> torch.Tensor:
        """∇L(θ) (or the minibatch gradient ∇L_B(θ) for ``indices``), same shape as θ. Cost: one forward and one
        backward pass (per ensemble member)."""
        if indices is None:
            return self._batched(grad(self._loss), theta)
        x, y = self._subset(indices)
        return self._batched(grad(lambda th: self._subset_loss(th, x, y)), theta)

    def value_and_grad(self, theta: torch.Tensor, indices=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(L(θ), ∇L(θ)) — or the minibatch pair for ``indices`` — from one forward and one backward pass."""
        if indices is None:
            g, value = self._batched(grad_and_value(self._loss), theta)
        else:
            x, y = self._subset(indices)
            g, value = self._batched(grad_and_value(lambda th: self._subset_loss(th, x, y)), theta)
        return value, g

    def hessian_products(self, theta: torch.Tensor, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(∇L(θ), ∇²L(θ) V) for one θ of shape (N,) and k vectors V of shape (N, k) (or one vector of shape (N,)).

        The gradient is taken by reverse mode with its graph kept (create_graph), and the k products
        ∇²L v_j = ∂⟨∇L(θ), v_j⟩/∂θ come from one backward pass through that graph with the k cotangents batched
        (reverse over reverse, Pearlmutter 1994; a model whose operations cannot be batched is swept once per
        vector): no N × N matrix, the gradient computed once. Cost: one gradient plus k backward passes through its
        graph, run as one batched pass. A loss that is linear in θ has ∇²L = 0.

        A chain of Linear layers and elementwise activations with the built-in ``mse`` or ``cross_entropy`` loss
        (:func:`flows.modules.linear_chain`, read once per problem) takes a structured route instead: Pearlmutter's
        R-operator as explicit tensor operations, one forward and one backward sweep with the k directions batched
        in every operation (:mod:`flows.modules.chain`) — for the digits MLP 64-32-10 at k = 5 about 2× one
        gradient, against ≈ 3.7× for the double-backward pass (benchmarks/contraction.py). Both results are detached
        (not differentiable further); θ is one parameter vector, not an ensemble.
        """
        self._check_single(theta, "hessian_products")
        vectors = torch.as_tensor(vectors)
        single = vectors.ndim == 1
        columns = vectors[:, None] if single else vectors
        if columns.ndim != 2 or columns.shape[0] != self.num_params or columns.shape[1] == 0:
            raise ValueError(f"vectors must have shape (N,) or (N, k) with N = {self.num_params} and k ≥ 1, got "
                             f"{tuple(vectors.shape)}")
        rows = columns.T.to(theta).contiguous()  # (k, N): the batched cotangents, one per row
        chain = self._linear_chain()
        if chain is not None:  # a chain of Linear layers and activations: the structured R-operator sweep
            g, products = chain.hessian_products(theta, rows)
            return g, products[0] if single else products.T
        with torch.enable_grad():
            th = theta.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self._loss(th), th, create_graph=True)
            products = None  # stays None when L is linear in θ: the gradient does not depend on θ
            if g.requires_grad:
                try:
                    (products,) = torch.autograd.grad(g, th, rows, is_grads_batched=True, retain_graph=True,
                                                      allow_unused=True)
                except RuntimeError:  # an operation without a batching rule: one backward pass per vector
                    each = [torch.autograd.grad(g, th, row, retain_graph=True, allow_unused=True)[0] for row in rows]
                    products = None if each[0] is None else torch.stack(each)
        products = torch.zeros_like(rows) if products is None else products
        g, products = g.detach(), products.detach().T
        return g, products[:, 0] if single else products

    def _linear_chain(self):
        """The model read as a chain of Linear layers and activations (:func:`flows.modules.linear_chain`), once;
        None for any other model or loss."""
        if not hasattr(self, "_chain"):
            from flows.modules.chain import linear_chain

            self._chain = linear_chain(self)
        return self._chain

    def sample_losses(self, theta: torch.Tensor, indices=None) -> torch.Tensor:
        """Per-sample losses ℓ_i(θ) = loss(model(x_i; θ), y_i) for one θ of shape (N,), shape (B,) over the training
        samples (or ``indices``). Requires a loss that is the mean of per-sample losses (see
        :meth:`check_sample_losses`). Cost: one forward pass, vmapped over samples."""
        self._check_single(theta, "sample_losses")
        self.check_sample_losses()
        x, y = self._subset(indices)
        return vmap(self._sample_loss, in_dims=(None, 0, 0))(theta, x, y)

    def sample_grads(self, theta: torch.Tensor, indices=None) -> torch.Tensor:
        """Per-sample gradients g_i = ∇ℓ_i(θ) for one θ of shape (N,), shape (B, N) over the training samples (or
        ``indices``); their mean is ∇L(θ). Cost: B forward and backward passes, vmapped (memory B·N)."""
        self._check_single(theta, "sample_grads")
        self.check_sample_losses()
        x, y = self._subset(indices)
        return vmap(grad(self._sample_loss), in_dims=(None, 0, 0))(theta, x, y)

    def weighted_gradients(self, theta: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Weighted sums of the per-sample gradients, Σ_i w_i ∇_θ ℓ_i(θ), with ℓ_i the per-sample losses
        (L = (1/B) Σ_i ℓ_i; :meth:`check_sample_losses`), for one θ or an ensemble and one or k weightings:

            θ (N,)    weights (B,) → (N,)      or  (k, B) → (k, N)
            θ (P, N)  weights (P, B) → (P, N)  or  (P, k, B) → (P, k, N)

        Uniform weights 1/B give ∇L; centred weights give the minibatch-noise products of :mod:`flows.sde`. Computed
        without any per-sample gradient (no B × N matrix): Σ_i w_i ∇ℓ_i = J_yᵀ [w_i ∂ℓ_i/∂y_i]_i, one forward pass
        and one pullback of the outputs per weighting, with ∂ℓ_i/∂y_i = B ∂L/∂y_i in closed form for the built-in
        losses (:func:`output_gradient`). A chain of Linear layers and activations with a built-in loss takes the
        structured sweep of :meth:`flows.modules.LinearChain.weighted_gradients`, which shares every operation
        between the paths of an ensemble (on the digits MLP with 16 paths over 1 797 samples 12.2 against 13.8 ms for
        the vmapped pullback, benchmarks/stochastic.py); any other model vmaps the pullback over the paths.
        The result is detached. Cost: per path one forward pass and k backward passes over the training data.
        """
        self._check(theta)
        self.check_sample_losses()
        weights = torch.as_tensor(weights).to(theta)
        batch = tuple(theta.shape[:-1])
        n = self.batch_size
        if len(batch) > 1 or weights.ndim not in (len(batch) + 1, len(batch) + 2) \
                or tuple(weights.shape[:len(batch)]) != batch or weights.shape[-1] != n:
            raise ValueError(f"weights must have shape {(*batch, n)} or {(*batch, 'k', n)} for θ of shape "
                             f"{tuple(theta.shape)} and {n} training samples, got {tuple(weights.shape)}")
        one_weighting = weights.ndim == len(batch) + 1
        if weights.numel() == 0:  # no paths or no weightings: nothing to sum
            return theta.new_zeros(*weights.shape[:-1], self.num_params)
        thetas = theta.detach().reshape(-1, self.num_params)
        w = weights.reshape(thetas.shape[0], -1, n)
        chain = self._linear_chain()
        if chain is not None:
            out = chain.weighted_gradients(thetas, w)
        else:
            x, y, loss_fn = self.inputs, self.targets, self.loss_fn

            def one(th, ww):
                outputs, pull = vjp(lambda t: self._outputs(t, x), th)
                per_sample = output_gradient(loss_fn, outputs, y) * n  # ∂ℓ_i/∂y_i
                cotangents = ww.reshape(*ww.shape, *([1] * (per_sample.ndim - 1))) * per_sample
                if ww.shape[0] == 1:
                    return pull(cotangents[0])[0][None]
                return vmap(pull)(cotangents)[0]

            out = vmap(one)(thetas, w).detach()
        if one_weighting:
            out = out[:, 0]
        return out.reshape(*batch, *out.shape[1:])

    def check_sample_losses(self) -> None:
        """Raise a ``ValueError`` unless L is the mean of per-sample losses, L(θ) = (1/B) Σ_i ℓ_i(θ).

        Minibatch noise models (per-sample gradients, their covariance) are defined only for such losses. Checked
        once, at θ₀ on up to 64 training samples, to a relative 1e-8 (the built-in "mse" and "cross_entropy" pass;
        a loss summed over the batch, or one that couples samples, is refused by name)."""
        if getattr(self, "_sample_losses_checked", False):
            return
        n = min(self.batch_size, 64)
        x, y = self.inputs[:n], self.targets[:n]
        try:
            with torch.no_grad():
                each = vmap(self._sample_loss, in_dims=(None, 0, 0))(self.theta0, x, y)
                whole = self._subset_loss(self.theta0, x, y)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ValueError(f"the model or the loss {self.loss_name!r} cannot be evaluated one sample at a time "
                             f"({type(exc).__name__}: {exc}), so the problem has no per-sample losses") from None
        if each.shape != (n,) or not torch.allclose(each.mean(), whole, rtol=1e-8, atol=1e-12):
            raise ValueError(f"the loss {self.loss_name!r} is not the mean of per-sample losses (mean of {n} "
                             f"per-sample values {float(each.mean()):.6g}, loss of the batch {float(whole):.6g}); a "
                             "minibatch noise model needs L = (1/B) Σ ℓ_i")
        self._sample_losses_checked = True

    def _check_single(self, theta: torch.Tensor, what: str) -> None:
        self._check(theta)
        if theta.ndim != 1:
            raise ValueError(f"{what} takes one θ of shape (N,), got shape {tuple(theta.shape)}")

    @property
    def is_classification(self) -> bool:
        """Integer class targets: accuracy is defined (argmax of the outputs against the label)."""
        return not self.targets.dtype.is_floating_point and not self.targets.dtype.is_complex

    def evaluate(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss (and accuracy, for classification) on every named eval set: ``{"test_loss": …,
        "test_accuracy": …}``. θ of shape (N,) gives scalars, (E, N) gives E values. Forward passes only."""
        out = {}
        for name, (inputs, targets) in self.eval_data.items():
            outputs = self.outputs(theta, inputs)
            if theta.ndim == 1:
                out[f"{name}_loss"] = self.loss_fn(outputs, targets)
            else:
                out[f"{name}_loss"] = vmap(lambda y, targets=targets: self.loss_fn(y, targets))(outputs)
            if self.is_classification:
                out[f"{name}_accuracy"] = (outputs.argmax(-1) == targets).to(self.dtype).mean(-1)
        return out

    def accuracy(self, theta: torch.Tensor, inputs=None, targets=None) -> torch.Tensor:
        """Fraction of argmax predictions equal to integer class targets (classification problems)."""
        y = self.outputs(theta, inputs)
        t = self.targets if targets is None else torch.as_tensor(targets, device=self.device)
        return (y.argmax(-1) == t).to(self.dtype).mean(-1)
