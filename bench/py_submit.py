#!/usr/bin/env python3
"""Submit throughput - Python's side of procpool_bench's `submit` workload.

N one-task submissions of inc(x) = x + 1 to a warm pool, keeping the handles,
then the result of each (checked):
  multiprocessing.Pool(W).apply_async(inc, (i,))     then .get() on all
  concurrent.futures.ProcessPoolExecutor(W).submit(inc, i)   then .result() on all
Both pools use the fork context, are created and warmed up once outside the timed
region, and take turns rep by rep so that drift hits both alike. One JSON line in
the format of ../shared/baselines (bench_overhead.py's per-variant summary).

usage: python3 py_submit.py [--n 100000] [--reps 5] [--workers 2]
"""
import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import platform
import statistics
import sys
import time


def inc(x):
    return x + 1


def summarize(times, n):
    med, lo, hi = statistics.median(times), min(times), max(times)
    return {
        "n": n,
        "seconds": {"median": med, "min": lo, "max": hi},
        "us_per_task": {"median": med / n * 1e6, "min": lo / n * 1e6, "max": hi / n * 1e6},
        "tasks_per_s": {"median": n / med, "min": n / hi, "max": n / lo},
    }


def timed(submit, result, n):
    t0 = time.perf_counter()
    handles = [submit(inc, i) for i in range(n)]
    out = [result(h) for h in handles]
    t = time.perf_counter() - t0
    if out != list(range(1, n + 1)):
        raise SystemExit("wrong result")
    return t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    ctx = mp.get_context("fork")  # as procpool; 3.14 defaults to forkserver
    times = {"pool_apply_async": [], "ppe_submit": []}
    with ctx.Pool(a.workers) as pool, cf.ProcessPoolExecutor(a.workers, mp_context=ctx) as ex:
        variants = {
            "pool_apply_async": (lambda f, x: pool.apply_async(f, (x,)), lambda h: h.get()),
            "ppe_submit": (ex.submit, lambda h: h.result()),
        }
        for submit, result in variants.values():
            timed(submit, result, 1000)  # warm-up: workers are up and running
        for _ in range(a.reps):
            for name, (submit, result) in variants.items():
                times[name].append(timed(submit, result, a.n))
    print(json.dumps({
        "scenario": "submit_throughput",
        "python": sys.executable, "version": platform.python_version(),
        "start_method": "fork", "workers": a.workers, "reps": a.reps, "n": a.n,
        "results": {name: summarize(t, a.n) for name, t in times.items()},
    }))


if __name__ == "__main__":
    main()
