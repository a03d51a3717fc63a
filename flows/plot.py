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
                x: str = "time", test: str | None = "test") -> Figure:
    """Loss against solver time (``x="time"``) or against vector-field evaluations (``x="nfe"``, from
    ``stats["nfe_at_output"]``), log scale, one curve per labelled trajectory (ensembles: one faint curve per
    member). Where a trajectory recorded the loss on the eval set named ``test`` (``metrics["test_loss"]``, see
    ``Problem(eval_data=…)``) it is drawn dashed in the same colour; ``test=None`` draws training curves only."""
    fig, ax = _axes(ax)
    dashed = False
    for label, traj in trajectories.items():
        if traj.loss is None:
            raise ValueError(f"trajectory {label!r} has no recorded loss (simulate with a problem)")
        xs = _x_values(traj, label, x)
        colour = _curves(ax, xs, traj.loss.cpu().numpy(), label=label)
        held = traj.metrics.get(f"{test}_loss") if test is not None else None
        if held is not None:
            _curves(ax, xs, held.cpu().numpy(), colour=colour, ls="--")
            dashed = True
    if dashed:
        ax.plot([], [], ls="--", color="gray", label=f"dashed: held-out {test!r} loss")
    ax.set_yscale("log")
    ax.set_xlabel(_X_LABELS[x])
    ax.set_ylabel("loss L(θ(t))")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return fig


_X_LABELS = {"time": "solver time t (continuous-time units)", "nfe": "vector-field evaluations"}


def _x_values(traj: Trajectory, label: str, x: str):
    """Output times, or the vector-field evaluations spent by each output time."""
    if x not in _X_LABELS:
        raise ValueError(f"x must be 'time' or 'nfe', got {x!r}")
    if x == "time":
        return traj.t.cpu().numpy()
    if "nfe_at_output" not in traj.stats:
        raise ValueError(f"trajectory {label!r} has no per-output evaluation counts (stats['nfe_at_output'])")
    return traj.stats["nfe_at_output"]


def _curves(ax: Axes, xs, values, *, label: str | None = None, colour=None, **style):
    """One thick line, or for an ensemble (values T × E) one faint line per member in one colour; returns it."""
    if values.ndim == 2:
        lines = ax.plot(xs, values, alpha=0.35, color=colour, **style)
        for line in lines[1:]:
            line.set_color(lines[0].get_color())
        if label is not None:
            lines[0].set_label(label)
        return lines[0].get_color()
    line, = ax.plot(xs, values, label=label, lw=2, color=colour, **style)
    return line.get_color()


def save(fig: Figure, path: str | os.PathLike, *, dpi: int = 120) -> None:
    """Write ``fig`` to ``path`` atomically (format from the suffix)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=os.path.splitext(os.fspath(path))[1].lstrip(".") or "png")


def _legend(ax: Axes, **kwargs) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, **kwargs)


def pca_trajectories(trajectories: Mapping[str, Trajectory], problem, *, ax: Axes | None = None, grid: int = 41,
                     margin: float = 0.25) -> Figure:
    """Parameter trajectories projected on the top two principal directions of all their states, over the
    contours of the loss on that plane (θ = mean + a·u₁ + b·u₂). Cost: grid² loss evaluations (batched)."""
    import numpy as np
    import torch

    fig, ax = _axes(ax)
    states = torch.cat([traj.theta.reshape(-1, traj.theta.shape[-1]) for traj in trajectories.values()])
    centre = states.mean(0)
    _, _, vh = torch.linalg.svd(states - centre, full_matrices=False)
    basis = vh[:2]
    coords = {label: ((traj.theta - centre) @ basis.T).cpu().numpy() for label, traj in trajectories.items()}
    every = np.concatenate(list(coords.values()))
    lo, hi = every.min(0), every.max(0)
    pad = margin * (hi - lo + 1e-12)
    a = np.linspace(lo[0] - pad[0], hi[0] + pad[0], grid)
    b = np.linspace(lo[1] - pad[1], hi[1] + pad[1], grid)
    aa, bb = np.meshgrid(a, b)
    plane = centre + torch.as_tensor(np.stack([aa.ravel(), bb.ravel()], 1), dtype=centre.dtype) @ basis
    with torch.no_grad():
        loss = torch.cat([problem.loss(chunk) for chunk in plane.split(256)]).reshape(grid, grid).cpu().numpy()
    levels = np.geomspace(max(loss.min(), 1e-12), loss.max(), 20)
    contour = ax.contourf(aa, bb, loss, levels=levels, cmap="Greys", norm=_log_norm(levels), alpha=0.6)
    fig.colorbar(contour, ax=ax, label="loss on the plane", format="%.3g")
    for label, xy in coords.items():
        line, = ax.plot(xy[:, 0], xy[:, 1], lw=2, label=label)
        ax.plot(xy[-1, 0], xy[-1, 1], "o", color=line.get_color(), ms=5)
    ax.plot(*coords[next(iter(coords))][0], "k*", ms=10, label="θ₀")
    ax.set(xlabel="principal direction 1", ylabel="principal direction 2",
           title="trajectories on their top two principal directions")
    _legend(ax)
    return fig


def _log_norm(levels):
    from matplotlib.colors import LogNorm

    return LogNorm(vmin=levels[0], vmax=levels[-1])


def action_curves(reports: Mapping, *, ax: Axes | None = None) -> Figure:
    """Cumulative action S(t) (solid) against its bound L(0) − L(t) (dashed), one colour per rule."""
    fig, ax = _axes(ax)
    for label, report in reports.items():
        line, = ax.plot(report.t, report.total, lw=2, label=f"{label}: S(t)")
        ax.plot(report.t, report.loss_drop, ls="--", lw=1, color=line.get_color())
    ax.plot([], [], ls="--", color="gray", label="bound L(0) − L(t)")
    ax.set(xlabel="solver time t", ylabel="cumulative action", title="action and its lower bound")
    _legend(ax)
    return fig


def gap_bars(rows: list[dict], *, ax: Axes | None = None) -> Figure:
    """The excess action S − (L(0) − L(T)) of each rule (rows of :func:`flows.action.compare`), log scale."""
    fig, ax = _axes(ax)
    names = [r["rule"] for r in rows]
    positive = [r["gap"] for r in rows if r["gap"] > 0]
    floor = min(positive) * 1e-3 if positive else 1e-12  # a gap of 0 (the G-gradient flow) sits on the floor
    gaps = [max(r["gap"], floor) for r in rows]
    bars = ax.bar(range(len(rows)), gaps, bottom=0, color=[f"C{i}" for i in range(len(rows))])
    ax.bar_label(bars, labels=["0: attains the bound" if r["gap"] <= floor else f"{r['gap']:.3g}" for r in rows],
                 fontsize=8)
    ax.set_ylim(bottom=floor / 2)
    ax.set_xticks(range(len(rows)), names, rotation=15, ha="right", fontsize=8)
    ax.set(yscale="log", ylabel="gap S − (L(0) − L(T))", title="distance from steepest descent")
    return fig


def contraction_rates(reports: Mapping, *, ax: Axes | None = None) -> Figure:
    """μ(t) (solid) and max Re λ(t) (dashed) of :func:`flows.contraction.analyze` reports."""
    fig, ax = _axes(ax)
    for label, report in reports.items():
        line, = ax.plot(report.t, report.mu, lw=2, label=f"{label}: μ(t)")
        ax.plot(report.t, report.max_real_eig, lw=1.2, ls="--", color=line.get_color(),
                label=f"{label}: max Re λ(t)")
    ax.axhline(0, color="k", lw=0.8)
    ax.set(xlabel="solver time t", ylabel="rate (1/time)", yscale="symlog",
           title="contraction rate (μ < 0: contracting)")
    _legend(ax)
    return fig


def natural_angles(recoveries: Mapping, *, ax: Axes | None = None) -> Figure:
    """ψ(t) in degrees (left axis) and κ_min(t) (right axis, log) of :func:`flows.natural.recover` results."""
    import torch

    fig, ax = _axes(ax)
    twin = ax.twinx()
    for i, (label, rec) in enumerate(recoveries.items()):
        ax.plot(rec.t, torch.rad2deg(rec.psi), lw=2, color=f"C{i}", label=f"ψ(t), {label}")
        twin.semilogy(rec.t, rec.kappa, lw=1.5, ls="--", color=f"C{i}", label=f"κ_min(t), {label}")
    ax.axhline(90, color="k", lw=0.8, ls=":")
    ax.set(xlabel="solver time t", ylabel="angle ψ between update and −∇L (degrees)", ylim=(0, 95),
           title="every effective rule is natural gradient descent")
    twin.set_ylabel("κ_min = (1 + sin ψ)/(1 − sin ψ)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = twin.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper right")
    return fig


def layer_diagnostics(rows: list[dict], *, ax: Axes | None = None) -> Figure:
    """Inner condition numbers ξ_a per block of ``Layerwise.diagnostics`` (log scale), with the block sizes."""
    fig, ax = _axes(ax)
    bars = ax.bar(range(len(rows)), [r["xi"] for r in rows], color="tab:purple")
    ax.bar_label(bars, labels=[f"n={r['size']}, {r['path']}" for r in rows], fontsize=8)
    ax.set_xticks(range(len(rows)), [f"block {r['block']}" for r in rows])
    ax.set(yscale="log", ylabel="ξ = cond(I + KKᵀ/μ)", title="per-layer inner condition numbers")
    return fig


def gap_curves(reports: Mapping, *, ax: Axes | None = None) -> Figure:
    """The cumulative gap S(t) − (L(0) − L(t)) of each rule (symlog scale: 0 for the G-gradient flow)."""
    fig, ax = _axes(ax)
    for label, report in reports.items():
        ax.plot(report.t, report.gap, lw=2, label=label)
    ax.set(xlabel="solver time t", ylabel="gap S(t) − (L(0) − L(t))", yscale="symlog",
           title="excess action: distance from steepest descent")
    ax.set_ylim(bottom=0)
    _legend(ax)
    return fig


def divergence_plot(div, bound, *, ax: Axes | None = None, title: str | None = None) -> Figure:
    """Distances of perturbed copies (a :func:`flows.contraction.divergence` result) against the contraction
    bound exp(∫μ dt)‖δθ(0)‖ (``bound`` = ``analyze(...).bound``), log scale."""
    fig, ax = _axes(ax)
    for k in range(div.distance.shape[1]):
        ax.plot(div.t, div.distance[:, k], lw=1.5, alpha=0.8, color="tab:blue",
                label="‖δθ(t)‖ of perturbed copies" if k == 0 else None)
        ax.plot(div.t, bound * div.distance[0, k], ls="--", lw=1.2, color="tab:red",
                label="bound exp(∫μ dt)‖δθ(0)‖" if k == 0 else None)
    ax.set(xlabel="solver time t", ylabel="distance to the reference trajectory", yscale="log",
           title=title or "divergence of nearby trajectories")
    _legend(ax)
    return fig


def spectra(eigenvalues: Mapping, *, ax: Axes | None = None) -> Figure:
    """Eigenvalues in the complex plane, one marker set per label (e.g. "rule, start" / "rule, end");
    symlog real axis so that small and large rates both show."""
    fig, ax = _axes(ax)
    markers = ["o", "x", "s", "+", "^", "v"]
    for i, (label, values) in enumerate(eigenvalues.items()):
        ax.scatter(values.real.cpu().numpy(), values.imag.cpu().numpy(), s=14, marker=markers[i % len(markers)],
                   color=f"C{i // 2}", alpha=0.7, label=label)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set(xlabel="Re λ(J) (1/time)", ylabel="Im λ(J)", title="Jacobian spectra")
    _legend(ax)
    return fig


def metric_ellipses(ax: Axes, centres, matrices, *, size: float, color: str = "tab:red",
                    label: str | None = "metric ellipses δᵀMδ = r²") -> None:
    """Draw {δ : δᵀMδ = r²} around each 2-D centre, r chosen so the largest semi-axis is ``size``."""
    import math

    import numpy as np
    from matplotlib.patches import Ellipse

    for centre, matrix in zip(centres, matrices):
        evals, evecs = np.linalg.eigh(np.asarray(matrix, dtype=float))
        semi = size * math.sqrt(evals[0]) / np.sqrt(evals)  # semi-axes r/√λ with r = size·√λ_min
        angle = math.degrees(math.atan2(evecs[1, 0], evecs[0, 0]))
        ax.add_patch(Ellipse(np.asarray(centre, dtype=float), 2 * semi[0], 2 * semi[1], angle=angle, fill=False,
                             color=color, lw=1.2))
    if label:
        ax.plot([], [], color=color, lw=1.2, label=label)


def phase_portrait(field, trajectories, *, ax: Axes | None = None, limits: float | None = None, metrics=None,
                   density: float = 0.8) -> Figure:
    """A 2-D system: streamlines of ``field`` (any f(t, x) on R²), the given trajectories, and optionally metric
    ellipses — ``metrics(t, x)`` → 2 × 2 SPD matrix, drawn at four points of each trajectory."""
    import numpy as np
    import torch

    fig, ax = _axes(ax)
    if limits is None:
        limits = 1.15 * max(float(tr.theta.abs().max()) for tr in trajectories)
    grid = np.linspace(-limits, limits, 17)
    xs, ys = np.meshgrid(grid, grid)
    points = torch.as_tensor(np.stack([xs.ravel(), ys.ravel()], 1))
    with torch.no_grad():
        flow = torch.stack([field(torch.zeros(()), p) for p in points]).numpy()
    ax.streamplot(xs, ys, flow[:, 0].reshape(xs.shape), flow[:, 1].reshape(xs.shape), color="0.75", density=density,
                  linewidth=0.7)
    for i, traj in enumerate(trajectories):
        x = traj.theta.cpu().numpy()
        ax.plot(x[:, 0], x[:, 1], lw=2, color="tab:blue", label="trajectories" if i == 0 else None)
        if metrics is not None:
            idx = np.linspace(0, len(x) - 1, 5).astype(int)[:-1]
            metric_ellipses(ax, x[idx], [metrics(traj.t[j], traj.theta[j]) for j in idx], size=0.08 * limits,
                            label="metric ellipses δᵀMδ = r²" if i == 0 else None)
    ax.set(xlim=(-limits, limits), ylim=(-limits, limits), aspect="equal", xlabel="x₁", ylabel="x₂")
    _legend(ax, loc="lower left")
    return fig


def generalisation(trajectories: Mapping[str, Trajectory], *, test: str = "test", x: str = "time",
                   ax=None) -> Figure:
    """Train against held-out learning curves along each run (MATH.md §7), in two or three panels:

    1. the training loss L(θ(t)) (solid) and the loss on the eval set ``test`` (dashed), log scale;
    2. the generalisation gap L_test(θ(t)) − L_train(θ(t));
    3. for classification runs, the accuracy on ``test`` (dashed) and on the training data (solid): from
       ``metrics["train_accuracy"]`` when the run recorded an eval set called ``"train"``, else by one forward
       pass per output time of the trajectory's problem when it is in memory (not after ``Trajectory.load``).

    ``x="time"`` puts solver time on the horizontal axis, ``x="nfe"`` vector-field evaluations. ``ax``: a
    sequence of two or three axes to draw into. Every trajectory must have recorded ``{test}_loss`` (simulate a
    problem built with ``eval_data={test: (inputs, targets)}``). Ensembles draw one faint line per member.
    """
    import numpy as np
    import torch

    for label, traj in trajectories.items():
        if traj.loss is None or f"{test}_loss" not in traj.metrics:
            raise ValueError(f"trajectory {label!r} has no recorded loss on the eval set {test!r}; build the problem "
                             f"with eval_data={{{test!r}: (inputs, targets)}} (recorded: {sorted(traj.metrics)})")
    accuracy = any(f"{test}_accuracy" in traj.metrics for traj in trajectories.values())
    panels = 3 if accuracy else 2
    if ax is None:
        fig = Figure(figsize=(5.0 * panels, 4.2), layout="constrained")
        axes = list(fig.subplots(1, panels))
    else:
        axes = list(ax)
        if len(axes) < panels:
            raise ValueError(f"generalisation needs {panels} axes for these runs, got {len(axes)}")
        fig = axes[0].figure
    loss_ax, gap_ax = axes[0], axes[1]
    for label, traj in trajectories.items():
        xs = _x_values(traj, label, x)
        train, held = traj.loss.cpu().numpy(), traj.metrics[f"{test}_loss"].cpu().numpy()
        colour = _curves(loss_ax, xs, train, label=label)
        _curves(loss_ax, xs, held, colour=colour, ls="--")
        _curves(gap_ax, xs, held - train, label=label, colour=colour)
        if not accuracy or f"{test}_accuracy" not in traj.metrics:
            continue
        _curves(axes[2], xs, traj.metrics[f"{test}_accuracy"].cpu().numpy(), colour=colour, ls="--", label=label)
        train_acc = traj.metrics.get("train_accuracy")
        if train_acc is None and traj.problem is not None:
            with torch.no_grad():
                train_acc = torch.stack([traj.problem.accuracy(state) for state in traj.theta])
        if train_acc is not None:
            _curves(axes[2], xs, np.asarray(train_acc.cpu()), colour=colour)
    loss_ax.plot([], [], color="gray", label="solid: training loss")
    loss_ax.plot([], [], ls="--", color="gray", label=f"dashed: held-out {test!r} loss")
    loss_ax.set(yscale="log", xlabel=_X_LABELS[x], ylabel="loss", title="training and held-out loss")
    gap_ax.axhline(0.0, color="k", lw=0.8)
    gap_ax.set(xlabel=_X_LABELS[x], ylabel=f"L_{test} − L_train", title="generalisation gap")
    for a in axes[:panels]:
        a.grid(True, which="both", alpha=0.3)
    _legend(loss_ax)
    if accuracy:
        acc_ax = axes[2]
        acc_ax.plot([], [], color="gray", label="solid: training data")
        acc_ax.plot([], [], ls="--", color="gray", label=f"dashed: {test!r}")
        acc_ax.set(xlabel=_X_LABELS[x], ylabel="accuracy", title="accuracy", ylim=(0.0, 1.02))
        _legend(acc_ax, loc="lower right")
    return fig


def sweep_curves(out, *, by: str | list[str] = "rule", hue: str | None = None, x: str = "time", band: str = "minmax",
                 test: bool = True, ax: Axes | None = None) -> Figure:
    """Loss curves of a sweep (:mod:`flows.sweep`), one line per group of runs that share the ``by`` fields (and
    ``hue``): the mean over the group's other fields (its seeds) with a shaded band — ``band="minmax"`` (min to
    max) or ``"std"`` (mean ± one standard deviation). ``x="time"`` or ``"nfe"`` (the mean evaluations spent by
    each output time). With ``test``, the held-out loss is drawn dashed in the same colour. Runs that did not
    finish (status other than "ok") are left out and counted in the legend."""
    import numpy as np

    from flows.sweep import load, run_path

    if band not in ("minmax", "std"):
        raise ValueError(f"band must be 'minmax' or 'std', got {band!r}")
    table = load(out) if not hasattr(out, "columns") else out
    if table.empty:
        raise ValueError(f"the sweep in {str(out)!r} has no finished runs yet")
    keys = [by] if isinstance(by, str) else list(by)
    if hue is not None and hue not in keys:
        keys.append(hue)
    missing = [k for k in keys if k not in table.columns]
    if missing:
        raise ValueError(f"unknown sweep field(s) {missing}; the table has {sorted(table.columns)}")
    fig, ax = _axes(ax, figsize=(7.0, 4.5))
    ok = table[table["status"] == "ok"]
    for group, rows in ok.groupby(keys, sort=True):
        group = group if isinstance(group, tuple) else (group,)
        label = ", ".join(f"{k}={v}" for k, v in zip(keys, group))
        trajs = [Trajectory.load(run_path(out, rid)) for rid in rows["run_id"]]
        lengths = {len(traj) for traj in trajs}
        if len(lengths) != 1:
            raise ValueError(f"group {label!r} mixes runs with different output times; add the differing field to by=")
        xs = np.mean([_x_values(traj, label, x) for traj in trajs], axis=0)
        colour = None
        for series, style in (("loss", "-"), ("test_loss", "--")):
            if series == "test_loss" and not (test and all("test_loss" in tr.metrics for tr in trajs)):
                continue
            values = np.stack([(tr.loss if series == "loss" else tr.metrics["test_loss"]).cpu().numpy()
                               for tr in trajs])
            mean = values.mean(0)
            low, high = (values.min(0), values.max(0)) if band == "minmax" else \
                (mean - values.std(0), mean + values.std(0))
            line, = ax.plot(xs, mean, ls=style, color=colour,
                            label=f"{label} (n={len(trajs)})" if series == "loss" else None)
            colour = line.get_color()
            ax.fill_between(xs, np.maximum(low, 1e-300), high, color=colour, alpha=0.18 if series == "loss" else 0.08)
    if test:
        ax.plot([], [], ls="--", color="gray", label="dashed: held-out loss")
    dropped = int((table["status"] != "ok").sum())
    if dropped:
        ax.plot([], [], ls="", label=f"{dropped} run(s) not finished (see the table)")
    ax.set_yscale("log")
    ax.set_xlabel(_X_LABELS[x])
    ax.set_ylabel("loss: mean over seeds, band " + ("min–max" if band == "minmax" else "± std"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def sweep_table(out, *, by: str | list[str] = "rule",
                columns=("final_loss", "test_loss", "test_accuracy", "nfe", "gap"), ax: Axes | None = None) -> Figure:
    """A table figure of a sweep: per group of ``by`` fields, the mean ± std over its runs of each column."""
    from flows.sweep import load

    table = load(out) if not hasattr(out, "columns") else out
    if table.empty:
        raise ValueError(f"the sweep in {str(out)!r} has no finished runs yet")
    keys = [by] if isinstance(by, str) else list(by)
    present = [c for c in columns if c in table.columns]
    ok = table[table["status"] == "ok"]
    cells = []
    for group, rows in ok.groupby(keys, sort=True):
        group = group if isinstance(group, tuple) else (group,)
        cells.append([*map(str, group), str(len(rows))] +
                     [f"{rows[c].mean():.4g} ± {rows[c].std(ddof=0):.2g}" for c in present])
    fig, ax = _axes(ax, figsize=(1.6 * (len(keys) + len(present) + 1), 0.45 * (len(cells) + 2)))
    ax.axis("off")
    ax.table(cellText=cells, colLabels=[*keys, "runs", *present], loc="center")
    return fig


def stability_report(report, *, title: str | None = None) -> Figure:
    """The three kinds of stability evidence of :func:`flows.contraction.report` on one time axis: the contraction
    rate μ(t) (moving metric, and frozen where both were measured) with max Re λ(J); the certificate
    exp(∫₀ᵗ μ ds) on a log scale; the running finite-time Lyapunov exponents."""
    contraction, exponents = report.contraction, report.lyapunov
    fig = Figure(figsize=(7.0, 7.5), layout="constrained")
    axes = fig.subplots(3, 1, sharex=True)
    t = contraction.t.numpy()
    axes[0].plot(t, contraction.mu.numpy(), label=f"μ ({contraction.metric})")
    if contraction.mu_frozen is not None:
        axes[0].plot(t, contraction.mu_frozen.numpy(), ls="--", label="μ, frozen metric (Ġ = 0)")
    if not bool(contraction.max_real_eig.isnan().all()):
        axes[0].plot(t, contraction.max_real_eig.numpy(), ls=":", label="max Re λ(J)")
    axes[0].axhline(0.0, color="gray", lw=0.8)
    axes[0].set_ylabel("rate")
    axes[0].legend(fontsize="small")
    axes[1].semilogy(t, contraction.bound.numpy(), color="tab:red", label="exp(∫₀ᵗ μ ds)")
    axes[1].axhline(1.0, color="gray", lw=0.8)
    axes[1].set_ylabel("‖δθ(t)‖ / ‖δθ(0)‖ ≤")
    axes[1].legend(fontsize="small")
    if exponents is not None:
        for i in range(exponents.running.shape[1]):
            axes[2].plot(exponents.t.numpy(), exponents.running[:, i].numpy(), label=f"λ_{i + 1}(t)")
        axes[2].axhline(0.0, color="gray", lw=0.8)
        axes[2].legend(fontsize="small")
    else:
        axes[2].text(0.5, 0.5, "no Lyapunov exponents (k = 0)", ha="center", va="center", transform=axes[2].transAxes)
    axes[2].set_ylabel("finite-time Lyapunov exponents")
    axes[2].set_xlabel("solver time t")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def sharpness(result, *, ax: Axes | None = None, radius: bool = False) -> Figure:
    """Sharpness λ_max(H) (or λ_max(G⁻¹H)) against time from :func:`flows.contraction.sharpness`, with the
    stability threshold 2/η dashed in the same colour — the edge-of-stability picture (Cohen et al. 2021). ``result``
    is one result or a mapping {label: result}. ``radius=True`` adds, on a second y-axis, the spectral radius of
    I − ηG⁻¹H (dotted; above 1 the discrete map is locally unstable)."""
    fig, ax = _axes(ax)
    results = result if isinstance(result, Mapping) else {None: result}
    twin = ax.twinx() if radius else None
    for label, res in results.items():
        name = "λ_max" if res.metric == "Euclidean" else f"λ_max(G⁻¹H), G = {res.metric}"
        line, = ax.plot(res.t, res.sharpness, lw=2, label=f"{label}: {name}" if label is not None else name)
        if res.threshold is not None:
            ax.axhline(res.threshold, ls="--", lw=1.2, color=line.get_color(),
                       label=f"2/η = {res.threshold:.3g}" + (f" ({label})" if label is not None else ""))
        if twin is not None and res.radius is not None:
            twin.plot(res.t, res.radius, ls=":", color=line.get_color())
    if twin is not None:
        twin.axhline(1.0, color="k", lw=0.6, ls=":")
        twin.set_ylabel("spectral radius of I − ηG⁻¹H (dotted)")
    ax.set(xlabel="time t = k·η", ylabel="sharpness", title="sharpness against the stability threshold 2/η")
    ax.grid(True, alpha=0.3)
    _legend(ax)
    return fig
