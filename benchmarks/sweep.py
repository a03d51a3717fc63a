"""Sweep throughput: 16 demo-sized runs on a 2-worker Dask LocalCluster against the same 16 runs in a serial loop.

Candidates (each timed in its own block, after its own warm-up run):
- serial, 1 torch thread: ``flows.sweep.execute(spec)`` for each spec in turn (what each worker does);
- serial, 2 torch threads: the same loop letting torch use both cores (a user's other choice);
- sweep: ``flows.sweep.run`` on an already started LocalCluster of 2 processes × 1 thread (cluster start-up is
  reported separately), writing every trajectory and the results table as a real sweep does.
Also the scheduling overhead per task: 400 empty tasks through the same client.

    python benchmarks/sweep.py [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

from _common import write_results

from flows.sweep import Grid, execute, run


def noop(i):
    return i


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 small runs, for a smoke test")
    args = parser.parse_args()
    if args.quick:
        base, axes = {"samples": 128, "hidden": [8], "t_end": 3.0, "points": 5}, {"seed": [0, 1, 2, 3]}
    else:  # demo-sized: the 64-32-10 MLP on the whole digits training split, as `flows demo`
        base = {"samples": None, "hidden": [32], "t_end": 10.0, "points": 21}
        axes = {"metric": ["euclidean", "layerwise"], "seed": list(range(8))}
    specs = Grid(base, axes).specs()
    print(f"{len(specs)} runs: {base} × {axes}", flush=True)

    execute(specs[0])  # warm-up: imports, data, first-call overheads
    start = time.perf_counter()
    for spec in specs:
        execute(spec, threads=1)
    serial_1 = time.perf_counter() - start
    print(f"serial, 1 thread : {serial_1:7.2f} s", flush=True)

    execute(specs[0], threads=2)
    start = time.perf_counter()
    for spec in specs:
        execute(spec, threads=2)
    serial_2 = time.perf_counter() - start
    print(f"serial, 2 threads: {serial_2:7.2f} s", flush=True)

    from distributed import Client

    from flows.sweep import local_cluster

    start = time.perf_counter()
    with local_cluster(2) as cluster, Client(cluster) as client:
        startup = time.perf_counter() - start
        warm = tempfile.mkdtemp()
        run(Grid(base, {"seed": [100, 101]}), out=warm, client=client, progress=False)  # warm both workers
        out = tempfile.mkdtemp()
        start = time.perf_counter()
        result = run(specs, out=out, client=client, progress=False)
        swept = time.perf_counter() - start
        assert result.computed == len(specs) and result.failed == 0, result.table
        print(f"sweep, 2 workers : {swept:7.2f} s (cluster start-up {startup:.2f} s)", flush=True)

        client.gather(client.map(noop, range(50), pure=False))  # warm-up
        per_task = []
        for _ in range(3):
            start = time.perf_counter()
            client.gather(client.map(noop, range(400), pure=False))
            per_task.append((time.perf_counter() - start) / 400)
        shutil.rmtree(out)
        shutil.rmtree(warm)

    payload = {
        "runs": len(specs), "base": base, "axes": axes,
        "serial_1_thread_s": serial_1, "serial_2_threads_s": serial_2, "sweep_2_workers_s": swept,
        "cluster_startup_s": startup,
        "speedup_vs_serial_1_thread": serial_1 / swept, "speedup_vs_serial_2_threads": serial_2 / swept,
        "speedup_including_startup_vs_best_serial": min(serial_1, serial_2) / (swept + startup),
        "overhead_per_task_ms": {"min": 1e3 * min(per_task), "median": 1e3 * statistics.median(per_task)},
    }
    print(f"speed-up: {payload['speedup_vs_serial_1_thread']:.2f}× vs serial 1 thread, "
          f"{payload['speedup_vs_serial_2_threads']:.2f}× vs serial 2 threads, "
          f"{payload['speedup_including_startup_vs_best_serial']:.2f}× vs the best serial with cluster start-up; "
          f"scheduling overhead per empty task {payload['overhead_per_task_ms']['min']:.2f} ms (min), "
          f"{payload['overhead_per_task_ms']['median']:.2f} ms (median)")
    write_results("sweep" + ("_quick" if args.quick else ""), payload)


if __name__ == "__main__":
    main()
