"""Trajectory: the result of a simulation — states at output times plus what was measured along the way.

Saved as one ``.npz`` file (numpy arrays + a JSON metadata string), written atomically: the data goes to a
temporary file in the same folder, which then replaces the target, so a crash never leaves half a file.
Arrays round-trip exactly (bit for bit).
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flows._io import atomic_path

_ARRAYS = ("t", "theta", "loss", "grad_norm", "action")
_METRIC_PREFIX = "metric:"


@dataclass
class Trajectory:
    """States θ(t) of one solve.

    Attributes:
        t: output times, shape (T,).
        theta: states, shape (T, N), or (T, E, N) for an ensemble of E members.
        loss: L(θ(t)), shape (T,) or (T, E); None when the field has no problem to evaluate.
        grad_norm: ‖∇L(θ(t))‖₂, same shape as ``loss``; None likewise.
        stats: solver counts — ``nfe`` (field evaluations), ``steps`` (attempted), ``accepted``,
            ``rejected``, ``wall_time`` (s), ``stopped_by_event`` (bool), ``nfe_at_output`` (evaluations
            spent by each output time: counted when the solver's step first passes it; the last is ``nfe``).
        metadata: JSON-serialisable description — rule, metric, solver, tolerances, versions.
        metrics: what was measured on the problem's named eval sets at every output time, e.g.
            ``{"test_loss": (T,), "test_accuracy": (T,)}`` ((T, E) for ensembles); see
            :meth:`flows.Problem.evaluate`. Saved and reloaded exactly.
        field, problem: the vector field (or update) and the problem that produced the trajectory, kept in
            memory so analyses need nothing more; not saved (None after :meth:`load`).
        action: with ``simulate(..., action=G)``, the running integrals (T, [E,] 4) of ½θ̇ᵀGθ̇, ½∇LᵀG⁻¹∇L,
            ½‖θ̇ + G⁻¹∇L‖²_G and ‖θ̇‖_G accumulated inside the solve (see :mod:`flows.action`).
    """

    t: torch.Tensor
    theta: torch.Tensor
    loss: torch.Tensor | None = None
    grad_norm: torch.Tensor | None = None
    stats: dict = dataclasses.field(default_factory=dict)
    metadata: dict = dataclasses.field(default_factory=dict)
    action: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    field: object = dataclasses.field(default=None, repr=False, compare=False)
    problem: object = dataclasses.field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.t.shape[0])

    @property
    def is_ensemble(self) -> bool:
        return self.theta.ndim == 3

    @property
    def final(self) -> torch.Tensor:
        """The last state θ(t_end)."""
        return self.theta[-1]

    def member(self, i: int) -> Trajectory:
        """Member i of an ensemble trajectory, as a single trajectory."""
        if not self.is_ensemble:
            raise ValueError("member() needs an ensemble trajectory (theta of shape T × E × N)")
        def pick(a):
            return None if a is None else a[:, i]

        return Trajectory(self.t, self.theta[:, i], pick(self.loss), pick(self.grad_norm),
                          dict(self.stats), {**self.metadata, "member": i}, pick(self.action),
                          {key: pick(value) for key, value in self.metrics.items()}, self.field, self.problem)

    def __repr__(self) -> str:
        shape = "×".join(str(s) for s in self.theta.shape)
        span = f"t∈[{self.t[0].item():.4g}, {self.t[-1].item():.4g}]" if len(self) else "empty"
        return f"Trajectory({shape}, {span}, nfe={self.stats.get('nfe')})"

    # -- persistence ------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write one ``.npz`` file atomically; returns the path written."""
        path = Path(path).expanduser()
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        arrays = {name: getattr(self, name).detach().cpu().numpy() for name in _ARRAYS
                  if getattr(self, name) is not None}
        header = {"stats": self.stats, "metadata": self.metadata,
                  "dtype": str(self.theta.dtype).removeprefix("torch.")}
        arrays.update({_METRIC_PREFIX + key: value.detach().cpu().numpy() for key, value in self.metrics.items()})
        arrays["header"] = np.array(json.dumps(header, default=_jsonable))
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Trajectory:
        """Read a file written by :meth:`save`."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no trajectory file at {str(path)!r}")
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(str(data["header"]))
                arrays = {name: torch.from_numpy(data[name].copy()) if name in data else None for name in _ARRAYS}
                metrics = {name.removeprefix(_METRIC_PREFIX): torch.from_numpy(data[name].copy())
                           for name in data.files if name.startswith(_METRIC_PREFIX)}
            stats, metadata = header["stats"], header["metadata"]
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{str(path)!r} is not a readable flows trajectory (a .npz written by "
                             f"Trajectory.save): {type(exc).__name__}: {exc}") from None
        if arrays["t"] is None or arrays["theta"] is None:
            raise ValueError(f"{str(path)!r} is not a readable flows trajectory: it has no 't' or 'theta' array")
        return cls(stats=stats, metadata=metadata, metrics=metrics, **arrays)


def _jsonable(obj):
    if isinstance(obj, torch.Tensor | np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return repr(obj)


def describe(obj):
    """What a trajectory's metadata records for a rule, metric or update: ``obj.describe()`` when it has one (a
    JSON-serialisable dict), else ``repr(obj)``."""
    method = getattr(obj, "describe", None)
    return method() if callable(method) else repr(obj)


def versions(*packages: str) -> dict:
    """Python's version and those of riemannian-flows, torch, numpy and ``packages`` (``"unknown"`` where a
    distribution is not installed), for a trajectory's or a results table's metadata."""
    import sys
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for dist in ("riemannian-flows", "torch", "numpy", *packages):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "unknown"
    return out
