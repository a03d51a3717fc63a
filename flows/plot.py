"""Figures. Each function returns a matplotlib ``Figure``, accepts ``ax=`` to draw into existing axes, and
leaves saving to the caller (:func:`save` writes atomically). No pyplot state is touched, so plotting works
headless and inside other programs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from flows._io import atomic_path
from flows.trajectory import Trajectory


def _axes(ax: Axes | None, figsize=(6.0, 4.0)) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def loss_curves(trajectories: Mapping[str, Trajectory], *, ax: Axes | None = None,
                x: str = "time") -> Figure:
    """Loss against solver time (``x="time"``) or against vector-field evaluations (``x="nfe"``, from
    ``stats["nfe_at_output"]``), log scale, one curve per labelled trajectory (ensembles: one faint curve per
    member)."""
    fig, ax = _axes(ax)
    for label, traj in trajectories.items():
        if traj.loss is None:
            raise ValueError(f"trajectory {label!r} has no recorded loss (simulate with a problem)")
        xs = traj.t.cpu().numpy()
        if x == "nfe":
            if "nfe_at_output" not in traj.stats:
                raise ValueError(f"trajectory {label!r} has no per-output evaluation counts (stats['nfe_at_output'])")
            xs = traj.stats["nfe_at_output"]
        loss = traj.loss.cpu().numpy()
        if loss.ndim == 2:
            lines = ax.plot(xs, loss, alpha=0.35)
            for line in lines[1:]:
                line.set_color(lines[0].get_color())
            lines[0].set_label(label)
        else:
            ax.plot(xs, loss, label=label, lw=2)
    ax.set_yscale("log")
    ax.set_xlabel("solver time t (continuous-time units)" if x == "time" else "vector-field evaluations")
    ax.set_ylabel("loss L(θ(t))")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return fig


def save(fig: Figure, path: str | os.PathLike, *, dpi: int = 120) -> None:
    """Write ``fig`` to ``path`` atomically (format from the suffix)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=os.path.splitext(os.fspath(path))[1].lstrip(".") or "png")
