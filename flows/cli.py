"""The ``flows`` command: ``flows demo`` (the main job), ``flows compare``, ``flows figures`` and ``flows simulate``.

Run ``flows --help`` or ``flows SUBCOMMAND --help`` for the flags.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import flows
from flows._io import write_text

METRICS = flows.metrics.NAMES
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def digits_problem(hidden: list[int], *, samples: int | None = None, seed: int = 0,
                   dtype=torch.float64) -> flows.Problem:
    """The bundled-digits classification problem: a tanh MLP 64 → hidden… → 10 under cross-entropy, trained on
    the fixed training split of :func:`flows.data.digits` (1 347 images, or a seeded subset of ``samples`` of
    them) with the 450 test images as the eval set ``"test"`` (recorded along every run)."""
    x, y = flows.data.digits(samples, split="train", seed=seed, dtype=dtype)
    model = flows.data.mlp([64, *hidden, 10], seed=seed, dtype=dtype)
    return flows.Problem(model, "cross_entropy", (x, y), dtype=dtype,
                         eval_data={"test": flows.data.digits(split="test", dtype=dtype)})


def make_metric(name: str, problem: flows.Problem, *, mu: float, metric_batch: int | None, seed: int = 0):
    """The metric called ``name`` on the command line (:func:`flows.metrics.by_name`)."""
    return flows.metrics.by_name(name, problem, mu=mu, metric_batch=metric_batch, seed=seed)


def summarize(label: str, problem: flows.Problem, traj: flows.Trajectory) -> dict:
    """One row per run: final training loss and accuracy, the held-out ``test_loss`` / ``test_accuracy``
    recorded at the final time (None without an eval set "test"), and the solver's counts."""
    return {
        "run": label,
        "final_loss": float(traj.loss[-1].mean()),  # an SDE ensemble: the mean over its paths
        "accuracy": float(problem.accuracy(traj.final).mean()),
        "test_loss": _final_metric(traj, "test_loss"),
        "test_accuracy": _final_metric(traj, "test_accuracy"),
        "t_end": float(traj.t[-1]),
        "nfe": int(traj.stats["nfe"]),
        "steps": traj.stats.get("steps"),
        "rejected": traj.stats.get("rejected"),
        "wall_time_s": float(traj.stats["wall_time"]),
    }


def _final_metric(traj: flows.Trajectory, key: str) -> float | None:
    return float(traj.metrics[key][-1].mean()) if key in traj.metrics else None  # SDE ensembles: path mean


COLUMNS = [("run", "{}"), ("final_loss", "{:.4g}"), ("accuracy", "{:.3f}"), ("t_end", "{:.3g}"),
           ("nfe", "{}"), ("steps", "{}"), ("rejected", "{}"), ("wall_time_s", "{:.2f}")]
DEMO_COLUMNS = [("run", "{}"), ("final_loss", "{:.4g}"), ("accuracy", "{:.3f}"), ("test_loss", "{:.4g}"),
                ("test_accuracy", "{:.3f}"), ("nfe", "{}"),
                ("wall_time_s", "{:.1f}"), ("action", "{:.4g}"), ("gap", "{:.3g}"), ("mu_start", "{:+.3g}"),
                ("mu_end", "{:+.3g}"), ("mu_max", "{:+.3g}"), ("contracting", "{:.2f}"), ("integral_mu", "{:+.3g}"),
                ("psi_deg", "{}"), ("kappa_min", "{}")]


def format_table(rows: list[dict], columns=COLUMNS) -> str:
    """A fixed-width text table; the numbers are rounded only for display."""
    cells = [[name for name, _ in columns]]
    for row in rows:
        cells.append([("-" if row.get(name) is None else fmt.format(row[name])) for name, fmt in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(rows: list[dict], columns=DEMO_COLUMNS) -> str:
    head = "| " + " | ".join(name for name, _ in columns) + " |"
    rule = "|" + "---|" * len(columns)
    body = ["| " + " | ".join("-" if r.get(n) is None else f.format(r[n]) for n, f in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def stability_row(rule, traj: flows.Trajectory, *, points: int = 5, tol: float = 1e-6) -> dict:
    """The demo's stability summary of a run: μ₂(J) (matrix-free Lanczos on sym J) at ``points`` output times
    spread over the run, giving the rate at the start and the end, its maximum, the fraction of the run spent
    contracting and ∫μ dt (trapezoid between those times) — :func:`flows.contraction.report` without Lyapunov
    exponents, which would cost another solve per rule."""
    from flows.contraction import report

    picks = torch.linspace(0, len(traj) - 1, min(points, len(traj))).round().long().unique()
    coarse = flows.Trajectory(traj.t[picks], traj.theta[picks], field=rule, problem=traj.problem)
    result = report(rule, coarse, k=0, method="lanczos", eigenvalues=False, tol=tol)
    mu = result.contraction.mu
    return {"mu_start": float(mu[0]), "mu_end": float(mu[-1]), "mu_max": result.row["max_mu"],
            "contracting": result.row["fraction_contracting"], "integral_mu": result.row["integral_mu"]}


def demo_rules(problem: flows.Problem, *, mu: float, metric_batch: int, seed: int) -> dict:
    """The four rules of ``flows demo``, all from the problem's θ₀."""
    return {
        "euclidean": flows.rules.GradientFlow(problem, flows.metrics.Euclidean()),
        "layerwise": flows.rules.GradientFlow(problem, flows.metrics.Layerwise(
            problem, mu=mu, metric_batch=2 * metric_batch, seed=seed)),
        "natural": flows.rules.GradientFlow(problem, flows.metrics.NaturalGradient(
            problem, mu=mu, metric_batch=metric_batch, seed=seed)),
        "feedback_alignment": flows.rules.FeedbackAlignment(problem, seed=seed),
    }


def _run_demo(args) -> int:
    from flows.natural import recover

    out = Path(args.out)
    problem = digits_problem(args.hidden, seed=args.seed)
    t = torch.linspace(0.0, args.t_end, args.points, dtype=torch.float64)
    reference = flows.metrics.Euclidean()
    print(f"flows demo: {problem}; four rules from one θ₀; t ∈ [0, {args.t_end:g}]; dopri5 rtol={args.rtol:g} "
          f"atol={args.atol:g}; action in the Euclidean metric", flush=True)
    trajectories, rows, reports = {}, [], {}
    for label, rule in demo_rules(problem, mu=args.mu, metric_batch=args.metric_batch, seed=args.seed).items():
        print(f"  simulating {label} …", flush=True)
        traj = flows.simulate(rule, problem.theta0, t, rtol=args.rtol, atol=args.atol, action=reference,
                              progress=not args.quiet)
        traj.save(out / f"{label}.npz")
        trajectories[label] = traj
        reports[label] = flows.action.action(traj)
        row = summarize(label, problem, traj)
        row.update({k: reports[label].summary()[k] for k in ("action", "gap", "loss_drop", "length")})
        row.update(stability_row(rule, traj, tol=args.lanczos_tol))
        if label == "feedback_alignment":
            rec = recover(rule, problem, traj, strict=False)  # κ_min is NaN where FA is not effective (ψ ≥ 90°)
            psi = torch.rad2deg(rec.psi)
            row["psi_deg"] = f"{float(psi[0]):.1f}→{float(psi[-1]):.1f}"
            row["kappa_min"] = f"{float(rec.kappa[0]):.3g}→{float(rec.kappa[-1]):.3g}"
            row["psi_series_deg"], row["kappa_series"] = psi.tolist(), rec.kappa.tolist()
            fig = flows.plot.natural_angles({"feedback alignment": rec})
            flows.plot.save(fig, out / "feedback_alignment_natural.png")
        rows.append(row)

    fig = flows.plot.loss_curves(trajectories)
    fig.axes[0].set_title(f"Learning a {'-'.join(map(str, [64, *args.hidden, 10]))} tanh MLP on digits, one θ₀")
    flows.plot.save(fig, out / "loss.png")
    fig = flows.plot.generalisation(trajectories)
    fig.suptitle(f"trained on the {problem.batch_size} digits of the training split, tested on the "
                 f"{len(problem.eval_data['test'][1])} held-out ones")
    flows.plot.save(fig, out / "generalisation.png")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12.0, 4.4), layout="constrained")
    left, right = fig.subplots(1, 2)
    flows.plot.action_curves(reports, ax=left)
    flows.plot.gap_bars([{"rule": r["run"], "gap": r["gap"]} for r in rows], ax=right)
    flows.plot.save(fig, out / "action.png")
    flows.plot.save(flows.plot.pca_trajectories(trajectories, problem), out / "trajectories_pca.png")

    summary = {"problem": repr(problem), "t_end": args.t_end, "rtol": args.rtol, "atol": args.atol, "mu": args.mu,
               "metric_batch": args.metric_batch, "action_metric": reference.describe(),
               "data": {"train": "digits split='train'", "test": "digits split='test'",
                        "n_train": problem.batch_size, "n_test": len(problem.eval_data["test"][1])}, "runs": rows}
    write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    table = format_markdown(rows)
    n_test = len(problem.eval_data["test"][1])
    write_text(out / "summary.md", f"# flows demo\n\n{problem!r}, t ∈ [0, {args.t_end:g}]; trained on the digits "
                                   f"training split, test_loss and test_accuracy on the {n_test} held-out test "
                                   "digits; action and gap in the Euclidean metric; μ = λ_max(sym J) at the start "
                                   f"and the end.\n\n{table}\n")
    print()
    print(format_table(rows, DEMO_COLUMNS))
    print(f"\nwrote loss.png, generalisation.png, action.png, trajectories_pca.png, feedback_alignment_natural.png, "
          f"summary.json, summary.md and the trajectories ({', '.join(f'{k}.npz' for k in trajectories)}) to {out}/")
    return 0


RULES = ("flow", "gd", "sgd", "momentum", "adam", "ngd", "sde")


def _check_positive(value, flag: str) -> None:
    if value is None or not value > 0 or value != value:
        raise ValueError(f"{flag} must be > 0 for --rule other than flow, got {value}")


def _run_simulate(args) -> int:
    dtype = DTYPES[args.dtype]
    problem = digits_problem(args.hidden, samples=args.samples, seed=args.seed, dtype=dtype)
    metric = make_metric(args.metric, problem, mu=args.mu, metric_batch=args.metric_batch, seed=args.seed)
    start = time.perf_counter()
    progress = not args.quiet
    if args.rule == "flow":
        options = {"step_size": args.step_size} if args.step_size else None
        t = torch.linspace(0.0, args.t_end, args.points, dtype=dtype)
        traj = flows.simulate(flows.rules.GradientFlow(problem, metric), problem.theta0, t, method=args.method,
                              rtol=args.rtol, atol=args.atol, options=options, progress=progress)
        label = args.metric
    else:
        _check_positive(args.lr, "--lr")
        steps = max(1, round(args.t_end / args.lr))
        if args.rule == "sde":
            _check_positive(args.batch_size, "--batch-size")
            t = torch.linspace(0.0, steps * args.lr, args.points, dtype=dtype)
            traj = flows.simulate_sde(problem, problem.theta0, t, lr=args.lr, batch_size=args.batch_size,
                                      paths=args.paths, metric=metric, seed=args.seed, progress=progress)
            label = f"sde (η={args.lr:g}, b={args.batch_size}, P={args.paths})"
        else:
            if args.rule != "ngd" and args.metric != "euclidean":
                raise ValueError(f"--metric {args.metric} has no effect on --rule {args.rule}; use --rule ngd for "
                                 "natural-gradient descent under a metric (or --rule flow / sde)")
            batch = None if args.rule == "gd" else args.batch_size
            update = {"gd": flows.discrete.GD, "sgd": flows.discrete.GD, "momentum": flows.discrete.Momentum,
                      "adam": flows.discrete.Adam}.get(args.rule)
            update = flows.discrete.NaturalGradientDescent(problem, metric) if update is None else update(problem)
            every = max(1, steps // max(1, args.points - 1))
            traj = flows.iterate(update, problem.theta0, steps, lr=args.lr, batch_size=batch, seed=args.seed,
                                 record_every=every, progress=progress)
            label = f"{args.rule} (η={args.lr:g}" + (f", b={batch})" if batch else ")")
    path = traj.save(args.output)
    print(format_table([summarize(label, problem, traj)]))
    print(f"\nwrote {path} ({time.perf_counter() - start:.1f} s)")
    return 0


def compare_rules(problem: flows.Problem, *, mu: float, metric_batch: int, seed: int = 0) -> dict:
    """The rules ``flows compare`` simulates: gradient flows under each metric of the library."""
    return {
        "gradient flow (Euclidean)": flows.metrics.Euclidean(),
        f"layerwise (μ={mu:g})": flows.metrics.Layerwise(problem, mu=mu, metric_batch=metric_batch, seed=seed),
        f"natural gradient (μ={mu:g})": flows.metrics.NaturalGradient(problem, mu=mu, metric_batch=metric_batch // 2,
                                                                     seed=seed),
        f"K-FAC (γ={mu:g})": flows.metrics.KFAC(problem, damping=mu, metric_batch=metric_batch, seed=seed),
    }


COMPARE_COLUMNS = [("rule", "{}"), ("action", "{:.6g}"), ("gap", "{:.3e}"), ("loss_drop", "{:.6g}"),
                   ("length", "{:.4g}"), ("final_loss", "{:.4g}"), ("time_to_level", "{:.4g}"), ("accuracy", "{:.3f}"),
                   ("test_loss", "{:.4g}"), ("test_accuracy", "{:.3f}")]


def _run_compare(args) -> int:
    out = Path(args.out)
    problem = digits_problem(args.hidden, samples=args.samples, seed=args.seed)
    reference = make_metric(args.reference, problem, mu=args.mu, metric_batch=args.metric_batch, seed=args.seed)
    t = torch.linspace(0.0, args.t_end, args.points, dtype=torch.float64)
    print(f"flows compare: {problem}; action measured in the {reference!r} metric; t ∈ [0, {args.t_end:g}]",
          flush=True)
    runs = {}
    for label, metric in compare_rules(problem, mu=args.mu, metric_batch=args.metric_batch, seed=args.seed).items():
        print(f"  simulating {label} …", flush=True)
        runs[label] = flows.simulate(flows.rules.GradientFlow(problem, metric), problem.theta0, t, rtol=args.rtol,
                                     atol=args.atol, action=reference, progress=not args.quiet)
    rows = flows.action.compare(runs, level=args.level)
    for row in rows:  # beside the action: what each run learned, on the training split and the held-out test split
        run = summarize(row["rule"], problem, runs[row["rule"]])
        row.update({key: run[key] for key in ("accuracy", "test_loss", "test_accuracy")})
    table = format_markdown(rows, COMPARE_COLUMNS)
    write_text(out / "compare.md", f"{table}\n\nAction, gap and length in the {reference!r} metric; time_to_level: the "
                                   f"first time the training loss reaches {args.level:g} ('-': never); accuracy on "
                                   "the digits training split, test_loss and test_accuracy on the held-out test "
                                   "split.\n")
    write_text(out / "compare.json", json.dumps({"problem": repr(problem), "reference": reference.describe(),
                                                 "level": args.level, "rows": rows}, indent=2) + "\n")
    print()
    print(table)
    print(f"\nwrote {out / 'compare.md'} and {out / 'compare.json'}")
    return 0


def _run_figures(args) -> int:
    """Run every example with its fixed seeds, writing figures/NAME.png."""
    import runpy

    root = Path(flows.__file__).resolve().parent.parent
    examples = sorted((root / "examples").glob("*.py"))
    if not examples:
        raise ValueError(f"no examples found under {root / 'examples'}; `flows figures` runs from a source "
                         "checkout (pip install -e .)")
    out = Path(args.out) if args.out else root / "figures"
    for script in examples:
        if args.only and script.stem not in args.only:
            continue
        print(f"== {script.stem}", flush=True)
        argv = [str(script), "--out", str(out / f"{script.stem}.png")] + (["--quick"] if args.quick else [])
        saved, sys.argv = sys.argv, argv
        try:
            runpy.run_path(str(script), run_name="__main__")
        except SystemExit as exc:
            if exc.code not in (0, None):
                raise ValueError(f"example {script.stem} exited with {exc.code}") from exc
        finally:
            sys.argv = saved
    return 0


def _positive_width(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"layer widths must be positive, got {value}")
    return value


def _add_flow_flags(parser, *, t_end: float, metric_batch: int, rtol, atol, quiet_help: str = "no progress bars"):
    """The flags every digits-MLP subcommand shares: network, damping, metric batch, time span, tolerances, seed."""
    parser.add_argument("--hidden", type=_positive_width, nargs="+", default=[32], help="hidden widths")
    parser.add_argument("--mu", type=float, default=1e-2, help="damping μ (γ for K-FAC) of the curvature metrics")
    parser.add_argument("--metric-batch", type=int, default=metric_batch,
                        help="samples in the curvature metrics (default: %(default)s)")
    parser.add_argument("--t-end", type=float, default=t_end, help="simulated time span (default: %(default)s)")
    parser.add_argument("--points", type=int, default=41, help="output times (default: %(default)s)")
    parser.add_argument("--rtol", type=float, default=rtol)
    parser.add_argument("--atol", type=float, default=atol)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help=quiet_help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flows", description="Simulate learning as continuous-time dynamics.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="the main job: four learning rules for an MLP on digits, compared",
                          description="Simulate a tanh MLP on the bundled digits data under Euclidean, "
                                      "layerwise and natural-gradient flows and feedback alignment from one θ₀; "
                                      "print a table (loss, accuracy, cost, action, gap, contraction rate, ψ and "
                                      "κ_min of feedback alignment); write figures, summary.json, summary.md and "
                                      "the trajectories.")
    demo.add_argument("--out", default="flows-out", help="output folder (default: %(default)s)")
    demo.add_argument("--lanczos-tol", type=float, default=1e-4, help="tolerance of the contraction-rate eigsh")
    _add_flow_flags(demo, t_end=20.0, metric_batch=32, rtol=1e-6, atol=1e-8)
    demo.set_defaults(run=_run_demo)

    cmp = sub.add_parser("compare", help="compare learning rules by their action on the digits MLP",
                         description="Simulate several rules from one θ₀ on the bundled digits MLP, measure "
                                     "each one's action, gap and length in a reference metric, and print and "
                                     "save the table (compare.md, compare.json).")
    cmp.add_argument("--out", default="flows-out", help="output folder (default: %(default)s)")
    cmp.add_argument("--samples", type=int, default=None, help="use a random subset of this many digits")
    cmp.add_argument("--reference", choices=METRICS, default="euclidean",
                     help="the metric G in which the action is measured (default: %(default)s)")
    cmp.add_argument("--level", type=float, default=0.5, help="loss level for the time-to-reach column")
    _add_flow_flags(cmp, t_end=10.0, metric_batch=64, rtol=1e-6, atol=1e-8)
    cmp.set_defaults(run=_run_compare)

    figs = sub.add_parser("figures", help="regenerate every figure under figures/ from the examples",
                          description="Run every example script (fixed seeds) and write figures/NAME.png.")
    figs.add_argument("--out", default=None, help="folder for the figures (default: the checkout's figures/)")
    figs.add_argument("--only", nargs="+", default=None, help="example names to run (default: all)")
    figs.add_argument("--quick", action="store_true", help="the examples' quick mode")
    figs.set_defaults(run=_run_figures)

    sim = sub.add_parser("simulate", help="one run (a flow, discrete training or the SGD SDE) of an MLP on digits",
                         description="Train a tanh MLP on the bundled digits data with one rule and save the "
                                     "trajectory: the gradient flow under --metric (torchdiffeq), discrete gradient "
                                     "descent, minibatch SGD, momentum, Adam or natural-gradient descent "
                                     "(flows.iterate, t = k·lr), or SGD's stochastic modified equation with P paths "
                                     "(flows.simulate_sde, torchsde).")
    sim.add_argument("--rule", choices=RULES, default="flow",
                     help="flow (default) | gd | sgd | momentum | adam | ngd (under --metric) | sde")
    sim.add_argument("--lr", type=float, default=None, help="learning rate η of the discrete rules and the SDE")
    sim.add_argument("--batch-size", type=int, default=32,
                     help="minibatch size b of sgd/momentum/adam/ngd and of the SDE's noise (default: %(default)s)")
    sim.add_argument("--paths", type=int, default=1, help="SDE paths in the ensemble (default: %(default)s)")
    sim.add_argument("--samples", type=int, default=None, help="use a random subset of this many digits")
    sim.add_argument("--metric", choices=METRICS, default="euclidean")
    sim.add_argument("--method", default="dopri5", help="any torchdiffeq method (default: %(default)s)")
    sim.add_argument("--step-size", type=float, default=None, help="step size for fixed-grid methods")
    sim.add_argument("--dtype", choices=sorted(DTYPES), default="float64")
    sim.add_argument("--output", "-o", default="flows-out/trajectory.npz", help="where to save the trajectory")
    _add_flow_flags(sim, t_end=20.0, metric_batch=32, rtol=None, atol=None, quiet_help="no progress bar")
    sim.set_defaults(run=_run_simulate)

    swp = sub.add_parser("sweep", help="many runs (a grid from a TOML file) on Dask, locally or on a cluster",
                         description="Run every config of a sweep file as a Dask task; write runs/<id>.npz, "
                                     "results.parquet/.csv, sweep.png (loss bands over seeds) and sweep_table.png. "
                                     "Rerunning skips finished runs.")
    swp.add_argument("file", help="the sweep file (TOML: [base], [grid], [[runs]])")
    swp.add_argument("--scheduler", default=None, help="address of a Dask scheduler (default: a local cluster)")
    swp.add_argument("--workers", type=int, default=None, help="worker processes of the local cluster (default: one "
                                                                 "per core)")
    swp.add_argument("--out", default="flows-sweep", help="the sweep folder (default: %(default)s)")
    swp.add_argument("--retries", type=int, default=2, help="Dask retries of a task that failed (default: %(default)s)")
    swp.add_argument("--by", default="rule,metric", help="fields that group runs in the figure (default: %(default)s)")
    swp.add_argument("--quiet", action="store_true", help="no progress bar")
    swp.set_defaults(run=_run_sweep)
    return parser


def _run_sweep(args) -> int:
    from flows import sweep

    grid = sweep.Grid.from_toml(args.file)
    print(f"flows sweep: {len(grid)} runs from {args.file} → {args.out}", flush=True)
    result = sweep.run(grid, out=args.out, scheduler=args.scheduler, workers=args.workers, retries=args.retries,
                       progress=not args.quiet)
    print(f"computed {result.computed}, skipped {result.skipped} (already done), failed {result.failed}")
    table = result.table
    by = [field for field in args.by.split(",") if field]
    columns = [c for c in ("final_loss", "final_accuracy", "test_loss", "test_accuracy", "nfe", "gap", "wall_time_s")
               if c in table.columns]
    print(table.groupby(by)[columns].mean().to_string(float_format=lambda v: f"{v:.4g}"))
    if (table["status"] == "ok").any():
        out = Path(args.out)
        flows.plot.save(flows.plot.sweep_curves(out, by=by), out / "sweep.png")
        flows.plot.save(flows.plot.sweep_table(out, by=by), out / "sweep_table.png")
        print(f"figures: {out / 'sweep.png'}, {out / 'sweep_table.png'}")
    bad = table[table["status"] != "ok"]
    for _, row in bad.iterrows():
        print(f"run {row['run_id']} {row['status']}: {str(row['error']).splitlines()[0]}", file=sys.stderr)
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("riemannian-flows")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except (ValueError, flows.FlowDivergedError) as exc:
        print(f"flows {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
