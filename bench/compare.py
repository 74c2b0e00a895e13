#!/usr/bin/env python3
"""procpool vs Python's multiprocessing, side by side, in one run.

For each workload it runs procpool's benchmark, then the matching Python
baseline (../shared/baselines), alternating (three rounds of each for the
fast workloads, whose medians are then the median of the rounds'
medians), and prints one table: procpool
median (min-max), Python median (min-max), the ratio, the target and whether
it is met, plus physical limits measured in the same run. Results also go to
a JSON file.

    python3 bench/compare.py                 # full sizes (~10 min)
    python3 bench/compare.py --quick         # small sizes: a smoke run (~1 min)
    python3 bench/compare.py --only tiny_cs1,startup
    python3 bench/compare.py --only submit,startup_spawn
    python3 bench/compare.py --only payload_sweep   # 128 MiB to 4 GiB results (~12 GB of memory)
    python3 bench/compare.py --only mpi      # procpool::mpi vs mpi4py.futures, mpirun -n 3 (--mpi-ranks)
    python3 bench/compare.py --only mpi --mpi-ranks 4   # 4 ranks sharing this host's CPUs
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run_json(cmd, timeout=1800):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout).stdout
    return json.loads(out.strip().splitlines()[-1])


def known_workload(bench, workload):
    """False when procpool_bench reports `workload` unknown (not built yet)."""
    probe = subprocess.run([bench, workload, "--reps", "1"], capture_output=True, text=True, timeout=600)
    if probe.returncode != 0 and "unknown workload" in probe.stderr:
        return False
    probe.check_returncode()
    return True


def alternate(rounds, ours, theirs):
    """Runs ours() then theirs() (each when given) `rounds` times, so that a
    slow stretch of the machine hits both sides alike; returns both lists."""
    a, b = [], []
    for _ in range(rounds):
        if ours:
            a.append(ours())
        if theirs:
            b.append(theirs())
    return a, b


def merged(results, *keys):
    """One result from several rounds: for each key, the median of the rounds'
    medians, the smallest min and the largest max. With no keys, the results
    are {median, min, max} themselves."""
    if not results:
        return None
    out = {}
    for key in keys or ("",):
        name = (lambda part: f"{key}_{part}") if key else (lambda part: part)
        out[name("median")] = statistics.median(r[name("median")] for r in results)
        out[name("min")] = min(r[name("min")] for r in results)
        out[name("max")] = max(r[name("max")] for r in results)
    return out


def fmt(m, lo, hi, digits=3):
    f = lambda x: f"{x:.{digits}g}"
    return f"{f(m)} ({f(lo)}-{f(hi)})"


LIFECYCLE_PY = r"""
import json, sys, time, multiprocessing as mp
def inc(x): return x + 1
n, reps = int(sys.argv[1]), int(sys.argv[2])
data = list(range(n))
runs = []
for _ in range(reps):
    t = time.perf_counter()
    p = mp.get_context("fork").Pool(2)
    p.map(inc, data)
    p.close(); p.join()
    runs.append(time.perf_counter() - t)
runs.sort()
print(json.dumps({"median": runs[len(runs)//2], "min": runs[0], "max": runs[-1]}))
"""


def spread(values):
    """{median, min, max} of single values from several rounds."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def mpi_section(a, q, rounds, rows, raw, have_python, limit):
    """procpool::mpi against mpi4py.futures.MPIPoolExecutor on the same host
    (mpirun -n --mpi-ranks, --mca btl tcp,self: the network path, not shared
    memory) and the same work, alternating; and a plain MPI ping-pong of the
    same message size as the floor for big results. mpi4py.futures gets as
    many workers as we have (one rank each, plus its client), unless
    --mpi4py-ranks says otherwise."""
    bench_dir = os.path.dirname(a.bench)
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")

    def mpirun(ranks):
        return ["mpirun", "-n", str(ranks), "--oversubscribe", "--bind-to", "none", "--mca", "btl", "tcp,self"]
    tiny, cpu, mib, big = ("2000", "16", "4", "8") if q else ("20000", "64", "16", "64")
    args = ["--tiny", tiny, "--cpu", cpu, "--task-ms", "50", "--mib", mib, "--big", big]

    def run(cmd):
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=1800, env=env).stdout
        return json.loads(out.strip().splitlines()[-1])

    have_mpi4py = have_python and subprocess.run([a.python, "-c", "import mpi4py.futures"],
                                                 capture_output=True).returncode == 0
    if have_python and not have_mpi4py:
        print("note: no mpi4py (apt-get install python3-mpi4py); procpool::mpi side only\n")
    ours_runs = []

    def run_ours():
        ours_runs.append(run(mpirun(a.mpi_ranks) + [os.path.join(bench_dir, "mpi_bench")] + args))
        return ours_runs[-1]

    def run_theirs():
        # The first of ours has run: its worker count sizes theirs.
        ranks = a.mpi4py_ranks or ours_runs[0]["workers"] + 1
        return run(mpirun(ranks) + [a.python, "-m", "mpi4py.futures", os.path.join(a.baselines, "bench_mpi4py.py")] + args)

    ours, theirs = alternate(rounds, run_ours, run_theirs if have_mpi4py else None)
    ping = [run(["mpirun", "-n", "2", "--oversubscribe", "--mca", "btl", "tcp,self",
                 os.path.join(bench_dir, "mpi_pingpong"), mib, "5" if q else "20"])["pingpong_gbps"]
            for _ in range(rounds)]
    raw["mpi"] = {"procpool": ours, "mpi4py": theirs, "pingpong_gbps": ping}

    def side(results, key):
        return spread([r[key] for r in results]) if results else None

    workers = ours[0]["workers"]
    layout = f"{workers} workers on {a.mpi_ranks} ranks" + (f" vs {theirs[0]['workers']} mpi4py workers" if theirs else "")
    # Both sides on a pool that is already up: mpi4py.futures' executor is
    # started before its timed map, and so is ours.
    for key, their_key, what in (("tiny_cs1_tasks_per_s", "tiny_cs1_tasks_per_s",
                                  f"MPI: {int(tiny) // 1000}k tiny tasks, chunksize 1 (tasks/s)"),
                                 ("tiny_auto_tasks_per_s", "tiny_chunked_tasks_per_s",
                                  f"MPI: {int(tiny) // 1000}k tiny tasks, automatic chunks, end to end (tasks/s)")):
        c, p = side(ours, key), side(theirs, their_key)
        rows.append((what, (c["median"], c["min"], c["max"]), p, (c["median"] / p["median"]) if p else None,
                     ">= 10x mpi4py.futures", lambda r: r >= 10,
                     layout + ("; theirs: chunksize n/(4 x workers)" if "chunked" in their_key else "")))
    # Ours again, after one map of the same 20k inputs, as theirs comes after
    # their chunksize-1 row's: the row above is our first after a 200-input warm-up.
    if "tiny_auto_second_tasks_per_s" in ours[0]:
        c, p = side(ours, "tiny_auto_second_tasks_per_s"), side(theirs, "tiny_chunked_tasks_per_s")
        rows.append((f"  the same, our second {int(tiny) // 1000}k map (tasks/s)", (c["median"], c["min"], c["max"]),
                     p, (c["median"] / p["median"]) if p else None, "(no target)", None,
                     "both after one map of the same inputs"))
    # Ours with the pool's start and stop inside the timing (theirs without):
    # what a one-off call costs.
    c, p = side(ours, "tiny_auto_end_to_end_tasks_per_s"), side(theirs, "tiny_chunked_tasks_per_s")
    rows.append((f"  the same, with mpi::Pool start and stop inside (tasks/s)", (c["median"], c["min"], c["max"]), p,
                 (c["median"] / p["median"]) if p else None, "(no target)", None,
                 "mpi4py's executor started outside its timing"))
    c, p = side(ours, "cpu_efficiency"), side(theirs, "cpu_efficiency")
    rows.append((f"MPI: {cpu} x 50 ms CPU tasks, parallel efficiency", (c["median"], c["min"], c["max"]), p,
                 (c["median"] / p["median"]) if p else None, ">= 0.95",
                 (lambda r, x=c["median"]: x >= 0.95), f"ideal = tasks x 50 ms / {workers} workers"))
    c, p = side(ours, "big_results_gbps"), side(theirs, "big_results_gbps")
    floor = statistics.median(ping)
    # The results are new memory in the caller: first touching it, on the
    # root's one thread that fills them, bounds the row (and mpi4py's) below
    # what a ping-pong of one reused buffer measures.
    touch_us = limit("first_touch_us_per_4KiB_page")
    fresh = f"; fresh pages alone cap the root at {4096 / touch_us / 1e3:.2f} GB/s (first touch)" \
        if touch_us == touch_us and touch_us > 0 else ""
    rows.append((f"MPI: {big} results of {mib} MiB over tcp (GB/s)", (c["median"], c["min"], c["max"]), p,
                 (c["median"] / p["median"]) if p else None, f">= 70% of MPI ping-pong {floor:.2f} GB/s",
                 (lambda r, x=c["median"], f=floor: x >= 0.7 * f), f"{100 * c['median'] / floor:.0f}% of ping-pong{fresh}"))
    # What one root can serve: its own CPU per chunk it sends and takes back
    # (chunksize 1; the root's node runs no worker in this layout).
    c = side(ours, "root_cpu_us_per_chunk")
    if c and c["median"] > 0:
        per_s = 1e6 / c["median"]
        rows.append(("MPI: root CPU per chunk (us)", (c["median"], c["min"], c["max"]), None, None, "(no target)", None,
                     f"one root core serves ~{per_s / 1000:.0f}k chunks/s: ~{per_s * 0.005:.0f} cores busy "
                     f"at 5 ms chunks, ~{per_s * 0.05:.0f} nodes at 50 ms node chunks"))


def payload_sweep(a, q, rows, raw, have_python):
    """Large results: procpool (a std::vector each, and SharedBuffer) next to
    Python's best (pickle through Pool.map, or multiprocessing.shared_memory:
    copied out, and attached without a copy), bench/py_payload_sweep.py.
    The largest rows need ~12 GB of memory on each side, one side at a time."""
    B, reps = a.bench, "2" if q else "3"
    sizes = ((2, 16), (1, 64)) if q else ((8, 128), (2, 1024), (1, 4096))
    zero_copy = ((8, 16), (1, 64)) if q else ((64, 16), (1, 4096))

    def python(tasks, mib):
        if not have_python:
            return None
        return run_json([a.python, os.path.join(HERE, "py_payload_sweep.py"), "--mib", str(mib),
                         "--tasks", str(tasks), "--reps", reps])

    def until_freed(c):
        # The dropped buffers' pages are freed on another thread, while the
        # floor frees its copies on the timed one: the target is judged on
        # the time until they are freed, the caller's time is shown too.
        return c.get("until_freed_gbps_median", c["gbps_median"]) / c["floor_gbps_median"]

    def row(what, c, p, target, check, note):
        rows.append((what, (c["gbps_median"], c["gbps_min"], c["gbps_max"]), p,
                     (c["gbps_median"] / p["median"]) if p else None, target, check, note))

    for tasks, mib in sizes:
        c = run_json([B, "payload_out", "--tasks", str(tasks), "--mib", str(mib), "--reps", reps])
        py_side = python(tasks, mib)
        ways = {k: py_side[k] for k in ("pickle_echo", "shm_copy") if py_side and k in py_side}
        best = max(ways, key=lambda k: ways[k]["median"], default=None)
        raw[f"payload_out_{tasks}x{mib}MiB"] = {"procpool": c, "python": py_side}
        frac = c["fraction_of_floor"]
        row(f"{tasks} results of {mib} MiB, std::vector (GB/s)", c, ways.get(best),
            f">= 70% of floor {c['floor_gbps_median']:.2f} GB/s", lambda r, f=frac: f >= 0.7,
            f"{100 * frac:.0f}% of floor; Python's best: {best}" if best else f"{100 * frac:.0f}% of floor")
    for tasks, mib in sizes:
        # Inputs the other way (the caller's vectors to the workers); Python's
        # sweep measures results only, so this row stands against the floor.
        c = run_json([B, "payload_in", "--tasks", str(tasks), "--mib", str(mib), "--reps", reps])
        raw[f"payload_in_{tasks}x{mib}MiB"] = {"procpool": c}
        frac = c["fraction_of_floor"]
        row(f"{tasks} inputs of {mib} MiB, std::vector (GB/s)", c, None,
            f">= 70% of floor {c['floor_gbps_median']:.2f} GB/s", lambda r, f=frac: f >= 0.7,
            f"{100 * frac:.0f}% of floor; no Python row (its sweep sends results)")
    for tasks, mib in zero_copy:
        c = run_json([B, "payload_zero_copy", "--tasks", str(tasks), "--mib", str(mib), "--reps", reps])
        py_side = python(tasks, mib)
        raw[f"payload_zero_copy_{tasks}x{mib}MiB"] = {"procpool": c, "python": py_side}
        frac, freed = c["fraction_of_floor"], until_freed(c)
        row(f"{tasks} results of {mib} MiB, SharedBuffer (GB/s)", c,
            py_side["shm_zero_copy"] if py_side else None,
            f">= 5x floor {c['floor_gbps_median']:.2f} GB/s, until freed",
            lambda r, f=freed: f >= 5,
            f"{freed:.1f}x the floor until the dropped buffers' pages are freed, {frac:.1f}x "
            "as the caller waits (they are freed on another thread); Python: shared_memory "
            "attached, not copied")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", default=os.path.join(ROOT, "build/release/bench/procpool_bench"))
    ap.add_argument("--baselines", default=os.path.join(ROOT, "../shared/baselines"))
    ap.add_argument("--python", default="/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable)
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--only", default="", help="comma-separated workloads")
    ap.add_argument("--json", default=os.path.join(ROOT, "build/bench-results.json"))
    ap.add_argument("--rounds", type=int, default=0, help="alternating rounds (0: 3, or 1 with --quick)")
    ap.add_argument("--mpi-ranks", type=int, default=3,
                    help="ranks of procpool::mpi (on one host they share its CPUs)")
    ap.add_argument("--mpi4py-ranks", type=int, default=0,
                    help="ranks of mpi4py.futures (0: one per procpool::mpi worker, plus its client)")
    ap.add_argument("--physlimits", default="",
                    help="a physlimits program built beforehand (where this machine has no C compiler)")
    a = ap.parse_args()
    if a.rounds < 0 or a.mpi_ranks < 1 or a.mpi4py_ranks < 0:
        ap.error("--rounds must be 0 or more, --mpi-ranks 1 or more, --mpi4py-ranks 0 or more")
    q = a.quick
    reps = "2" if q else "5"
    # Workloads of a few milliseconds: more runs each, so that the median is
    # not at the mercy of a VM's scheduling noise (both sides get the same).
    short_reps = "2" if q else "15"
    # The fast workloads alternate with Python three times over; each side's
    # median is the median of its three rounds' medians.
    rounds = a.rounds or (1 if q else 3)
    only = set(filter(None, a.only.split(",")))
    have_python = os.path.isdir(a.baselines) and os.path.exists(a.python)
    if not have_python:
        print(f"note: no Python baselines at {a.baselines} (or no {a.python}); procpool side only\n")
    B = a.bench
    py = lambda script, *args: run_json([a.python, os.path.join(a.baselines, script), *args])
    rows, raw = [], {}

    def want(name):
        return not only or name in only

    # Physical limits, measured in this run.
    limits = None
    if have_python:
        exe = a.physlimits or os.path.join(tempfile.gettempdir(), "procpool-physlimits")
        if not a.physlimits:
            subprocess.run(["gcc", "-O2", "-o", exe, os.path.join(a.baselines, "physlimits.c")], check=True)
        limits = run_json([exe] + (["2000", "2", "100", "2", "1000", "10"] if q else ["50000", "5", "500", "10", "20000", "50"]))
        raw["physlimits"] = limits

    def limit(key):
        return limits[key]["median"] if limits and key in limits else float("nan")

    n = "20000" if q else "200000"
    if want("tiny_cs1"):
        cs, ps = alternate(rounds, lambda: run_json([B, "tiny_cs1", "--n", n, "--reps", reps]),
                           (lambda: py("bench_overhead.py", "--n", n, "--n-slow", "200", "--reps", reps)["results"]["pool_map_cs1"]["tasks_per_s"]) if have_python else None)
        c, p = merged(cs, "tasks_per_s"), merged(ps)
        raw["tiny_cs1"] = {"procpool": cs, "python": ps}
        rows.append((f"{int(n) // 1000}k tiny tasks, chunksize 1 (tasks/s)",
                     (c["tasks_per_s_median"], c["tasks_per_s_min"], c["tasks_per_s_max"]), p,
                     (c["tasks_per_s_median"] / p["median"]) if p else None, ">= 10x Python", lambda r: r >= 10))
    if want("tiny_lifecycle"):
        cs, ps = alternate(rounds, lambda: run_json([B, "tiny_lifecycle", "--n", n, "--reps", short_reps]),
                           (lambda: run_json([a.python, "-c", LIFECYCLE_PY, n, short_reps])) if have_python else None)
        c, p = merged(cs, "pool_s", "fork_per_call_s"), merged(ps)
        raw["tiny_lifecycle"] = {"procpool": cs, "python": ps}
        rows.append((f"{int(n) // 1000}k tiny tasks, auto chunks, Pool start+map+stop (s)",
                     (c["pool_s_median"], c["pool_s_min"], c["pool_s_max"]), p,
                     (p["median"] / c["pool_s_median"]) if p else None, ">= 10x Python", lambda r: r >= 10))
        rows.append(("  same, fork per call: procpool::map (s)",
                     (c["fork_per_call_s_median"], c["fork_per_call_s_min"], c["fork_per_call_s_max"]), p,
                     (p["median"] / c["fork_per_call_s_median"]) if p else None, "(reference)", None))
    if want("submit"):
        # n submit() calls, then get() on all, against Pool.apply_async and
        # ProcessPoolExecutor.submit (py_submit.py), the faster of them; 3 reps
        # a round: Python alone takes ~30 s a round for 10^5 tasks.
        sn, sreps = ("5000", "2") if q else ("100000", "3")
        cs, ps = alternate(rounds, lambda: run_json([B, "submit", "--n", sn, "--reps", sreps, "--processes", "2"]),
                           (lambda: run_json([a.python, os.path.join(HERE, "py_submit.py"), "--n", sn, "--reps", sreps])["results"])
                           if have_python else None)
        c = merged(cs, "tasks_per_s")
        raw["submit"] = {"procpool": cs, "python": ps}
        py_variants = {label: merged([r[key]["tasks_per_s"] for r in ps])
                       for key, label in (("pool_apply_async", "Pool.apply_async"), ("ppe_submit", "ProcessPoolExecutor.submit"))} if ps else {}
        p = max(py_variants.values(), key=lambda v: v["median"], default=None)
        rows.append((f"{int(sn) // 1000}k submit() kept as futures, then get() on all (tasks/s)",
                     (c["tasks_per_s_median"], c["tasks_per_s_min"], c["tasks_per_s_max"]), p,
                     (c["tasks_per_s_median"] / p["median"]) if p else None, ">= 10x the faster Python", lambda r: r >= 10,
                     "; ".join(f"{k} {v['median']:.3g}/s" for k, v in py_variants.items())))
    mib = "4" if q else "16"
    tasks = "8" if q else "64"
    payload_py = None
    if have_python and (want("payload_out") or want("payload_in")):
        payload_py = py("bench_payload.py", "--sizes-mib", mib, "--tasks", tasks, "--reps", reps)["results"][f"{mib}MiB"]
    for name, what, py_variant in (("payload_out", f"{tasks} results of {mib} MiB (GB/s)", "pool_map_cs1_echo"),
                                   ("payload_in", f"{tasks} inputs of {mib} MiB, lazy range (GB/s)", "pool_map_cs1_len")):
        if not want(name):
            continue
        c = run_json([B, name, "--tasks", tasks, "--mib", mib, "--reps", reps])
        p = payload_py[py_variant]["GBps"] if payload_py else None
        raw[name] = {"procpool": c, "python": p}
        frac = c["fraction_of_floor"]
        ratio = (c["gbps_median"] / p["median"]) if p else None
        need_python = name == "payload_out"
        rows.append((what, (c["gbps_median"], c["gbps_min"], c["gbps_max"]), p, ratio,
                     f">= 70% of floor {c['floor_gbps_median']:.2f} GB/s" + (" and >= 2x Python" if need_python else ""),
                     (lambda r, f=frac, np=need_python: f >= 0.7 and (not np or r >= 2)),
                     f"{100 * frac:.0f}% of floor"))
    if want("payload_sweep"):
        payload_sweep(a, q, rows, raw, have_python)
    if want("startup"):
        def python_startup():
            s = py("bench_startup.py", "--reps", reps, "--methods", "fork")["results"]["pool_fork"]["warm"]["total"]
            return {k: v * 1e3 for k, v in s.items()}
        cs, ps = alternate(rounds, lambda: run_json([B, "startup", "--reps", "10" if q else "20"]),
                           python_startup if have_python else None)
        c, p = merged(cs, "pool_ms", "map_one_ms"), merged(ps)
        raw["startup"] = {"procpool": cs, "python": ps}
        rows.append(("Pool start + one task + stop (ms)", (c["pool_ms_median"], c["pool_ms_min"], c["pool_ms_max"]), p,
                     (p["median"] / c["pool_ms_median"]) if p else None, "<= 1 ms and >= 10x Python",
                     (lambda r, m=c["pool_ms_median"]: m <= 1 and r >= 10)))
    if want("startup_spawn"):
        # procpool::Start::spawn (procpool_bench startup_spawn prints pool_ms like
        # startup) against Python's spawn and forkserver Pools, the faster of them.
        def python_spawn():
            res = py("bench_startup.py", "--reps", reps, "--methods", "spawn,forkserver")["results"]
            return {m: {k: v * 1e3 for k, v in res[f"pool_{m}"]["warm"]["total"].items()} for m in ("spawn", "forkserver")}
        built = known_workload(B, "startup_spawn")
        cs, ps = alternate(rounds, (lambda: run_json([B, "startup_spawn", "--reps", "10" if q else "20"])) if built else None,
                           python_spawn if have_python else None)
        raw["startup_spawn"] = {"procpool": cs if built else "not built", "python": ps}
        py_methods = {m: merged([r[m] for r in ps]) for m in ("spawn", "forkserver")} if ps else {}
        p = min(py_methods.values(), key=lambda v: v["median"], default=None)
        c = merged(cs, "pool_ms") if built else None
        note = "; ".join(f"Python {m} {v['median']:.3g} ms" for m, v in py_methods.items())
        rows.append(("Pool start (spawn) + one task + stop (ms)",
                     (c["pool_ms_median"], c["pool_ms_min"], c["pool_ms_max"]) if c else None, p,
                     (p["median"] / c["pool_ms_median"]) if p and c else None,
                     ">= 10x the faster of Python spawn/forkserver", (lambda r: r >= 10) if c else None,
                     note if c else "not built: procpool_bench has no startup_spawn workload yet" + (f"; {note}" if note else "")))
    if want("cpu"):
        c = run_json([B, "cpu", "--tasks", "16" if q else "64", "--task-ms", "10" if q else "50", "--reps", reps])
        p = None
        if have_python:
            pr = py("bench_cpu.py", "--tasks", "16" if q else "64", "--task-ms", "10" if q else "50", "--reps", reps)["results"]["pool_map_cs1"]
            p = {"median": pr["efficiency"], "min": pr["efficiency"], "max": pr["efficiency"]}
        raw["cpu"] = {"procpool": c, "python": p}
        rows.append((f"{16 if q else 64} x {10 if q else 50} ms CPU tasks: parallel efficiency", (c["efficiency"], c["efficiency"], c["efficiency"]), p,
                     c["procpool_over_threads"], ">= 0.98, within 2% of std::thread",
                     (lambda r, e=c["efficiency"]: e >= 0.98 and r <= 1.02),
                     f"std::thread eff {c['threads_efficiency']:.3f}; time vs threads x{c['procpool_over_threads']:.3f}"))
    if want("shared"):
        vocab, keys = ("200000", "10000") if q else ("5000000", "100000")
        c = run_json([B, "shared", "--vocab", vocab, "--keys", keys, "--reps", reps])
        p = py("bench_shared.py", "--vocab", vocab, "--keys", keys, "--reps", reps, "--slow-reps", "1",
               "--variants", "b_initargs_fork")["results"]["b_initargs_fork"]["total_s"] if have_python else None
        raw["shared"] = {"procpool": c, "python": p}
        rows.append((f"{vocab}-entry table shared, {keys} lookups (s)",
                     (c["wall_s_median"], c["wall_s_min"], c["wall_s_max"]), p,
                     (p["median"] / c["wall_s_median"]) if p else None,
                     "extra memory <= 5% of table, >= 5x Python",
                     (lambda r, x=c["extra_fraction"]: x <= 0.05 and r >= 5),
                     f"workers' extra memory {100 * c['extra_fraction']:.2f}% of {c['table_mb']:.0f} MB"))
        rows.append(("  same table after procpool::share_with_huge_pages() (s)",
                     (c["huge_wall_s_median"], c["huge_wall_s_min"], c["huge_wall_s_max"]), p,
                     (p["median"] / c["huge_wall_s_median"]) if p else None,
                     "extra memory <= 5% of table, >= 5x Python",
                     (lambda r, x=c["huge_extra_fraction"]: x <= 0.05 and r >= 5),
                     f"workers' extra memory {100 * c['huge_extra_fraction']:.2f}%; moving "
                     f"{c['huge_pages_mb']:.0f} MB once took {c['huge_pages_move_s']:.2f} s"))
    if want("imap_flat"):
        items = "3000000" if q else "100000000"
        c = run_json([B, "imap_flat", "--n", items], timeout=3600)
        raw["imap_flat"] = {"procpool": c}
        g = c["growth_percent"]
        rows.append((f"imap over {int(items):.0e} lazy items: RSS growth from 1e6 (%)", (g, g, g), None, None,
                     "<= 1%", (lambda r, g=g: g <= 1), f"RSS {c['rss_at_1e6_kb'] / 1024:.1f} -> {c['rss_max_kb'] / 1024:.1f} MB, {c['items_per_s'] / 1e6:.1f} M items/s"))
    if want("progress"):
        # 10^7 tasks (~70 ms a run): at 10^6 a run took ~6 ms and the VM's noise
        # alone moved the ratio by +-8 %.
        c = run_json([B, "progress", "--n", "100000" if q else "10000000", "--reps", short_reps])
        raw["progress"] = {"procpool": c}
        r = c["ratio_on_over_off"]
        rows.append((f"progress bar on {c['tasks']:.0e} tiny tasks: time on/off", (r, r, r), None, None,
                     "no measurable cost (<= 1.05)", (lambda r, x=r: x <= 1.05),
                     f"median of paired on/off ratios; ratio of medians {c['ratio_of_medians']:.3f}; stderr: {c['stderr']}"))

    if want("mpi") and os.path.exists(os.path.join(os.path.dirname(B), "mpi_bench")):
        mpi_section(a, q, rounds, rows, raw, have_python, limit)

    # The table.
    print(f"physical limits (this run): pipe round trip {limit('pipe_pingpong_rtt_us_unpinned'):.1f} us, "
          f"memcpy {limit('memcpy_64MiB_GBps'):.1f} GB/s, fork+wait {limit('fork_waitpid_us_small_heap'):.0f} us, "
          f"first touch {limit('first_touch_us_per_4KiB_page'):.2f} us/page")
    print()
    print("| workload | procpool median (min-max) | Python median (min-max) | ratio | target | met | note |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    met_all = True
    for row in rows:
        what, c, p, ratio, target, check = row[:6]
        note = row[6] if len(row) > 6 else ""
        ps = fmt(p["median"], p["min"], p["max"]) if p else "-"
        rs = f"{ratio:.2f}x" if ratio is not None else "-"
        if c is None:
            ok = "n/a"  # procpool side not built
        elif check is None:
            ok = "-"
        elif p is None and ratio is None and "Python" in target:
            ok = "n/a"  # no Python baseline in this run
        else:
            ok = "yes" if check(ratio if ratio is not None else 0) else "NO"
        if ok == "NO":
            met_all = False
        print(f"| {what} | {fmt(*c) if c else '-'} | {ps} | {rs} | {target} | {ok} | {note} |")
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": q, "results": raw}, f, indent=1)
    print(f"\nraw results: {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
