"""Shared helpers of the peer benchmarks: timing, percentiles, the task-count budget, JSON out.

Every peer runs the same two workload shapes as crates/paddock/benches/dispatch.rs:
(a) sequential round trips of a no-op task (submit, run, caller sees the result), p50/p99;
(b) N no-op tasks submitted at once, timed until every result is available, tasks/s.
"""
import argparse
import json
import math
import sys
import time


def args(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--roundtrips", type=int, default=2000)
    p.add_argument("--tasks", type=int, default=20000)
    p.add_argument("--budget-s", type=float, default=60.0,
                   help="cap on the throughput run: fewer tasks if a 1,000-task pilot says N would take longer")
    p.add_argument("--json", required=True)
    return p.parse_args()


def percentile_ms(samples, p):
    s = sorted(samples)
    i = min(max(math.ceil(len(s) * p), 1), len(s)) - 1
    return s[i] * 1000.0


def round_trips(one, n, warmup=50):
    """Times `one()` (submit and wait for the result) n times after `warmup` calls."""
    samples = []
    for i in range(n + warmup):
        t0 = time.perf_counter()
        one()
        dt = time.perf_counter() - t0
        if i >= warmup:
            samples.append(dt)
    return {
        "n": n,
        "p50_ms": percentile_ms(samples, 0.50),
        "p99_ms": percentile_ms(samples, 0.99),
        "mean_ms": sum(samples) * 1000.0 / n,
    }


def throughput(batch, wanted, budget_s):
    """`batch(n)` submits n tasks at once and returns when all results are in. A 1,000-task
    pilot estimates the rate; the measured run uses `wanted` tasks or what fits the budget."""
    t0 = time.perf_counter()
    batch(1000)
    pilot = 1000 / (time.perf_counter() - t0)
    n = min(wanted, max(1000, int(pilot * budget_s) // 1000 * 1000))
    t0 = time.perf_counter()
    batch(n)
    total = time.perf_counter() - t0
    return {"tasks": n, "wanted": wanted, "total_s": total, "tasks_per_s": n / total,
            "pilot_tasks_per_s": pilot}


def write(path, result):
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result), file=sys.stderr)


def rss_kib(pids):
    import psutil
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss // 1024
        except psutil.Error:
            pass
    return total
