"""Sweeps: many runs — seeds × rules × metrics × hyperparameters — on Dask distributed.

    spec (plain data) ──► run id = hash(spec) ──► a Dask task ──► out/runs/<id>.npz  +  a summary row
                                                                                   └──► out/results.parquet, .csv

A run is described by a :class:`RunSpec`, plain data that reads from a TOML table; a :class:`Grid` is the
cartesian product of lists of values over any of its fields (plus explicit runs). :func:`run` submits one Dask task
per run to a ``distributed.LocalCluster`` of worker processes (one torch thread each, so the workers do not
oversubscribe the cores) or to any Dask scheduler given by address or client — the scheduling, retries of tasks
lost with a worker, and the progress of futures are Dask's; this module only describes runs and keeps the results.

Nothing is lost: the run id is a content hash of the spec, a worker writes its trajectory atomically, and the client
rewrites the results table atomically after every completed run. A rerun skips every run whose trajectory file and
row already exist, so an interrupted sweep resumes where it stopped. A run that raises (a diverged flow, a config
that cannot be built) becomes a row with its status and error text; the sweep goes on.

A sweep file::

    [base]                      # fields shared by every run (RunSpec's defaults fill the rest)
    dataset = "digits"
    samples = 256
    hidden = [16]
    t_end = 10.0

    [grid]                      # the cartesian product of these lists
    metric = ["euclidean", "layerwise", "natural"]
    seed = [0, 1, 2]

Run it with ``flows sweep SWEEP.toml`` (a local cluster) or ``flows sweep SWEEP.toml --scheduler tcp://HOST:8786``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from flows.trajectory import versions

RULES = ("flow", "feedback_alignment")
METRICS = ("euclidean", "layerwise", "natural", "kfac")
DATASETS = ("digits", "mnist1d", "teacher_student")
TABLE = "results"


@dataclass(frozen=True)
class RunSpec:
    """One run, as plain data (every field has a default; a sweep file overrides any of them).

    Attributes:
        dataset: ``"digits"`` (train split; the test split is the eval set ``"test"``), ``"mnist1d"`` (4 000 / 1 000,
            generated offline) or ``"teacher_student"`` (regression; test set from the same teacher).
        samples: training samples (a seeded subset; None: the whole training split).
        hidden: hidden widths of the tanh MLP.
        rule: ``"flow"`` (θ̇ = −G⁻¹∇L under ``metric``) or ``"feedback_alignment"``.
        metric: ``"euclidean"``, ``"layerwise"``, ``"natural"`` or ``"kfac"`` (for ``rule="flow"``).
        mu: damping μ of the curvature metrics; metric_batch: samples in their metric (None: all).
        seed: initial weights and the training subset.
        t_end, points: the horizon and the number of output times.
        method, rtol, atol, step_size: torchdiffeq's, passed through.
        contraction: also measure μ₂(J) at the start and the end (matrix-free Lanczos).
    """

    dataset: str = "digits"
    samples: int | None = 256
    hidden: tuple[int, ...] = (16,)
    rule: str = "flow"
    metric: str = "euclidean"
    mu: float = 1e-2
    metric_batch: int | None = 32
    seed: int = 0
    t_end: float = 10.0
    points: int = 21
    method: str = "dopri5"
    rtol: float = 1e-6
    atol: float = 1e-8
    step_size: float | None = None
    contraction: bool = False

    def __post_init__(self):
        checks = {"dataset": DATASETS, "rule": RULES, "metric": METRICS}
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose one of {list(allowed)}")
        if self.samples is not None and self.samples < 1:
            raise ValueError(f"samples must be positive or None, got {self.samples}")
        if not self.hidden or any(int(h) < 1 for h in self.hidden):
            raise ValueError(f"hidden must list positive widths, got {list(self.hidden)}")
        if not self.t_end > 0 or self.points < 2:
            raise ValueError(f"t_end must be positive and points ≥ 2, got t_end={self.t_end}, points={self.points}")
        if not self.mu > 0:
            raise ValueError(f"mu must be positive, got {self.mu}")

    @classmethod
    def from_dict(cls, values: Mapping, *, where: str = "run") -> RunSpec:
        """A spec from a mapping (a TOML table), with every field's type checked and unknown fields refused."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; a run has {sorted(fields)}")
        converted = {name: _convert(name, fields[name].type, value, where) for name, value in values.items()}
        try:
            return cls(**converted)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["hidden"] = list(self.hidden)
        return out

    @property
    def run_id(self) -> str:
        """A content hash of the spec (sorted JSON): the same config always gets the same id."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _convert(name: str, annotation: str, value, where: str):
    """Check ``value`` against the field's annotation (a string, under ``from __future__ import annotations``)."""
    optional = "None" in annotation
    if value is None and optional:
        return None
    wrong = ValueError(f"{where}: field {name!r} must be {annotation.replace(' | ', ' or ')}, got {value!r}")
    if annotation.startswith("tuple"):
        if not isinstance(value, list | tuple) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                          for v in value):
            raise wrong
        return tuple(int(v) for v in value)
    if annotation.startswith("bool"):
        if not isinstance(value, bool):
            raise wrong
        return value
    if annotation.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong
        return value
    if annotation.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong
        return float(value)
    if annotation.startswith("str"):
        if not isinstance(value, str):
            raise wrong
        return value
    return value


@dataclass(frozen=True)
class Grid:
    """The runs of a sweep: ``base`` fields, the cartesian product over ``axes`` (field → list of values), and any
    explicit ``runs`` (each a mapping of fields over ``base``)."""

    base: Mapping = dataclasses.field(default_factory=dict)
    axes: Mapping = dataclasses.field(default_factory=dict)
    runs: tuple = ()

    def specs(self) -> list[RunSpec]:
        for name, values in self.axes.items():
            if not isinstance(values, list | tuple) or not values:
                raise ValueError(f"grid: field {name!r} must list at least one value, got {values!r}")
        names = list(self.axes)
        specs = [RunSpec.from_dict({**self.base, **dict(zip(names, combo))}, where=f"grid {dict(zip(names, combo))}")
                 for combo in itertools.product(*(self.axes[n] for n in names))] if names else []
        specs += [RunSpec.from_dict({**self.base, **extra}, where=f"runs[{i}]") for i, extra in enumerate(self.runs)]
        if not names and not self.runs:
            specs = [RunSpec.from_dict(dict(self.base), where="base")]
        unique = list(dict.fromkeys(specs))  # a spec listed twice is one run
        return unique

    def __len__(self) -> int:
        return len(self.specs())

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> Grid:
        """Read a sweep file: tables ``[base]`` and ``[grid]`` and an array of tables ``[[runs]]``."""
        path = Path(path).expanduser()
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            raise ImportError("reading sweep files needs Python ≥ 3.11 (the standard library's tomllib); on 3.10 "
                              "build the Grid in Python instead") from None
        if not path.is_file():
            raise FileNotFoundError(f"no sweep file at {str(path)!r}")
        try:
            table = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{str(path)!r} is not a valid TOML sweep file: {exc}") from None
        unknown = sorted(set(table) - {"base", "grid", "runs"})
        if unknown:
            raise ValueError(f"{str(path)!r}: unknown table(s) {unknown}; a sweep file has [base], [grid] and [[runs]]")
        grid = cls(table.get("base", {}), table.get("grid", {}), tuple(table.get("runs", ())))
        try:
            grid.specs()
        except ValueError as exc:
            raise ValueError(f"{str(path)!r}: {exc}") from None
        return grid


# --------------------------------------------------------------------------------------------------------
# One run (what a worker executes)
# --------------------------------------------------------------------------------------------------------


def build(spec: RunSpec):
    """The problem and the rule (a vector field) that ``spec`` describes."""
    import flows

    dtype = torch.float64
    if spec.dataset == "digits":
        train = flows.data.digits(spec.samples, split="train", seed=spec.seed, dtype=dtype)
        test, sizes, loss = flows.data.digits(split="test", dtype=dtype), (64, 10), "cross_entropy"
    elif spec.dataset == "mnist1d":
        x, y = flows.data.mnist1d(split="train", dtype=dtype)
        if spec.samples is not None:
            idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(spec.seed))[:spec.samples]
            x, y = x[idx], y[idx]
        train, test, sizes, loss = (x, y), flows.data.mnist1d(split="test", dtype=dtype), (40, 10), "cross_entropy"
    else:
        teacher = (10, 20, 5)
        n = spec.samples or 512
        train = flows.data.teacher_student(n, teacher, noise=0.1, seed=0, dtype=dtype)
        test = flows.data.teacher_student(n, teacher, noise=0.1, seed=0, split="test", dtype=dtype)
        sizes, loss = (teacher[0], teacher[-1]), "mse"
    model = flows.data.mlp([sizes[0], *spec.hidden, sizes[1]], seed=spec.seed, dtype=dtype)
    problem = flows.Problem(model, loss, train, eval_data={"test": test})
    if spec.rule == "feedback_alignment":
        return problem, flows.rules.FeedbackAlignment(problem, seed=spec.seed)
    metric = flows.metrics.by_name(spec.metric, problem, mu=spec.mu, metric_batch=spec.metric_batch, seed=spec.seed)
    return problem, flows.rules.GradientFlow(problem, metric)


@contextlib.contextmanager
def _torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def execute(spec: RunSpec, *, threads: int = 1):
    """Run one spec in this process: ``(trajectory or None, summary row)``. Never raises for a failing run: a
    diverged flow keeps its partial trajectory and gets status ``"diverged"``, any other failure ``"error"``.

    Runs with ``threads`` torch threads (1 by default, as on a sweep's workers), so a serial run reproduces a
    worker's result bit for bit.
    """
    import flows

    row = {"run_id": spec.run_id, **{k: (json.dumps(v) if isinstance(v, list) else v)
                                     for k, v in spec.to_dict().items()}}
    row.update(status="ok", error="", versions=json.dumps(versions("torchdiffeq", "dask", "distributed")))
    start = time.perf_counter()
    traj = None
    with _torch_threads(threads):
        try:
            problem, field = build(spec)
            t = torch.linspace(0.0, spec.t_end, spec.points, dtype=torch.float64)
            options = {"step_size": spec.step_size} if spec.step_size is not None else None
            traj = flows.simulate(field, problem.theta0, t, method=spec.method, rtol=spec.rtol, atol=spec.atol,
                                  options=options, action=flows.metrics.Euclidean(), progress=False)
            row.update(_measure(spec, problem, field, traj))
        except flows.FlowDivergedError as exc:
            traj = exc.trajectory
            row.update(status="diverged", error=str(exc))
        except Exception as exc:  # noqa: BLE001 - a failing run is recorded, and the sweep goes on
            row.update(status="error", error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}")
    row["wall_time_s"] = time.perf_counter() - start
    return traj, row


def _measure(spec: RunSpec, problem, field, traj) -> dict:
    import flows

    report = flows.action.action(traj).summary()
    row = {
        "final_loss": float(traj.loss[-1]),
        "final_accuracy": float(problem.accuracy(traj.final)) if problem.is_classification else math.nan,
        "test_loss": float(traj.metrics["test_loss"][-1]),
        "test_accuracy": float(traj.metrics["test_accuracy"][-1]) if "test_accuracy" in traj.metrics else math.nan,
        "nfe": int(traj.stats["nfe"]),
        "action": float(report["action"]),
        "gap": float(report["gap"]),
    }
    if spec.contraction:
        from flows.contraction import rate

        row["mu_start"], row["mu_end"] = (rate(field, theta, t=float(ti), method="lanczos", eigenvalues=False).mu
                                          for ti, theta in ((traj.t[0], traj.theta[0]), (traj.t[-1], traj.theta[-1])))
    return row


def run_task(spec_values: dict, out: str) -> dict:
    """The Dask task: execute one spec and write its trajectory atomically to ``out/runs/<id>.npz``."""
    spec = RunSpec.from_dict(spec_values)
    traj, row = execute(spec)
    if traj is not None:
        traj.save(run_path(out, spec.run_id))
    return row


def run_path(out: str | os.PathLike, run_id: str) -> Path:
    return Path(out).expanduser() / "runs" / f"{run_id}.npz"


# --------------------------------------------------------------------------------------------------------
# The sweep (the client side)
# --------------------------------------------------------------------------------------------------------


def load(out: str | os.PathLike):
    """The results table of a sweep folder as a pandas DataFrame (empty if no run finished yet)."""
    import pandas as pd

    path = Path(out).expanduser() / f"{TABLE}.parquet"
    if not path.exists():
        return pd.DataFrame()
    return pd.read_parquet(path)


def _write_table(out: Path, rows: Iterable[dict]) -> None:
    import pandas as pd

    from flows._io import atomic_path

    frame = pd.DataFrame(list(rows))
    if not frame.empty:
        frame = frame.sort_values("run_id", kind="stable").reset_index(drop=True)
    with atomic_path(out / f"{TABLE}.parquet") as tmp:
        frame.to_parquet(tmp, index=False)
    with atomic_path(out / f"{TABLE}.csv") as tmp:
        frame.to_csv(tmp, index=False)


@contextlib.contextmanager
def _client(client, scheduler: str | None, workers: int | None):
    """The given client; or one connected to ``scheduler``; or a LocalCluster of worker processes (closed after)."""
    if client is not None:
        yield client
        return
    from distributed import Client

    if scheduler is not None:
        with Client(scheduler) as connected:
            yield connected
        return
    with local_cluster(workers) as cluster, Client(cluster) as local:
        yield local


def local_cluster(workers: int | None = None):
    """A ``distributed.LocalCluster`` of ``workers`` processes (default: one per core) with one thread each and one
    torch/OpenMP/BLAS thread per process, so the workers share the cores without oversubscribing them.

    Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_=65536`` in its workers to hand freed memory back to the system
    early; torch's many short-lived tensors then pay for page faults on every allocation (measured here: the same
    run 1.65× slower inside a worker), so the cluster starts its workers with glibc's default instead.
    """
    import dask
    from distributed import LocalCluster

    n = workers or os.cpu_count() or 1
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        return LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None, env=env)


@dataclass
class SweepResult:
    """What :func:`run` did: the table, and how many runs it computed, skipped (already done) and how many failed."""

    table: object
    computed: int
    skipped: int
    failed: int


def run(grid: Grid | Iterable[RunSpec], *, out: str | os.PathLike, client=None, scheduler: str | None = None,
        workers: int | None = None, retries: int = 2, progress: bool = True,
        on_result: Callable[[dict], None] | None = None) -> SweepResult:
    """Run every spec of ``grid`` as a Dask task and keep the results in ``out``.

    Args:
        grid: a :class:`Grid` or any iterable of :class:`RunSpec`.
        out: the sweep folder: ``runs/<id>.npz`` per run and the table ``results.parquet`` / ``results.csv``.
        client: a ``distributed.Client`` to use (left open); else ``scheduler`` (an address such as
            ``tcp://host:8786``); else a ``LocalCluster`` of ``workers`` processes (default: one per core), one torch
            thread each, shut down at the end.
        retries: Dask's retries of a task that raised (a task lost with its worker is rescheduled by Dask itself).
        on_result: called with each completed row (e.g. to stop a sweep by raising KeyboardInterrupt).

    A rerun skips the runs whose file and row exist. If the sweep is interrupted (KeyboardInterrupt, an error in
    ``on_result``), the pending tasks are cancelled, the table keeps every finished row, and the exception goes on.
    """
    from tqdm.auto import tqdm

    out = Path(out).expanduser()
    specs = grid.specs() if isinstance(grid, Grid) else list(grid)
    previous = load(out)
    rows = {r["run_id"]: r for r in previous.to_dict("records")} if not previous.empty else {}
    todo = [s for s in specs if not (s.run_id in rows and run_path(out, s.run_id).exists())]
    skipped = len(specs) - len(todo)
    computed = failed = 0
    if todo:
        with _client(client, scheduler, workers) as dask:
            from distributed import as_completed

            # keys name the run and this call, never an earlier one: Dask hands back a result it still holds for a
            # key without running the task (so no file would be written), and cancels a resubmitted key whose
            # cancellation from an interrupted call is still under way
            call = uuid.uuid4().hex[:8]
            futures = [dask.submit(run_task, spec.to_dict(), str(out), key=f"flows-run-{spec.run_id}-{call}",
                                   retries=retries) for spec in todo]
            bar = tqdm(total=len(todo), disable=None if progress else True, desc="sweep", unit="run")
            try:
                for future in as_completed(futures):
                    row = future.result()
                    rows[row["run_id"]] = row
                    computed += 1
                    failed += row["status"] != "ok"
                    _write_table(out, rows.values())
                    bar.update(1)
                    if on_result is not None:
                        on_result(row)
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
            finally:
                bar.close()
    elif not (out / f"{TABLE}.parquet").exists():
        _write_table(out, rows.values())
    return SweepResult(load(out), computed, skipped, failed)
