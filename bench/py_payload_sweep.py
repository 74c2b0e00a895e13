#!/usr/bin/env python3
"""Large results from worker processes, Python's best ways, one size at a time.

TASKS results of MIB MiB each, from multiprocessing.Pool(2) workers forked
after the payload was made (they return it: what is timed is the transport,
as in procpool_bench payload_out / payload_zero_copy). Variants:
  pickle_echo   Pool.map returns the bytes (pickled through the pipe); only
                up to --pickle-max-mib, as it needs several copies at once.
  shm_copy      the worker copies the bytes into a new
                multiprocessing.shared_memory block and returns its name; the
                caller copies them out into a bytes object of its own and
                unlinks the block (a result the caller owns, like a vector).
  shm_zero_copy the blocks were filled before the timed call (not timed);
                the call returns their names and the caller attaches them
                without copying (like procpool::SharedBuffer).
Also the floor: the caller copying the payload into fresh memory TASKS times.
GB/s = TASKS * MIB MiB / seconds. One JSON line goes to stdout.

usage: python3 bench/py_payload_sweep.py --mib 128 --tasks 8 [--reps 3] [--pickle-max-mib 1024]
"""
import argparse
import json
import multiprocessing as mp
import statistics
import time
from multiprocessing import resource_tracker, shared_memory

MiB = 1 << 20
PAYLOAD = b""
STOCK = []


def echo(_):
    return PAYLOAD


def to_shm(_):
    block = shared_memory.SharedMemory(create=True, size=len(PAYLOAD))
    block.buf[:] = PAYLOAD
    name = block.name
    block.close()
    # The caller unlinks it: this worker's tracker must not (nor warn about it).
    resource_tracker.unregister(block._name, "shared_memory")
    return name


def stock_up(_):
    STOCK.append(to_shm(0))
    return 0


def from_stock(_):
    return STOCK.pop()


def owned_copy(name):
    block = shared_memory.SharedMemory(name=name)
    data = bytes(block.buf)
    block.close()
    block.unlink()
    return data


def timed(fn, reps, prepare=None):
    times = []
    for _ in range(reps):
        if prepare:
            prepare()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def gbps(times, moved):
    med, lo, hi = statistics.median(times), min(times), max(times)
    return {"median": moved / med / 1e9, "min": moved / hi / 1e9, "max": moved / lo / 1e9}


def main():
    global PAYLOAD
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=128)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pickle-max-mib", type=int, default=1024)
    a = ap.parse_args()
    size = a.mib * MiB
    moved = size * a.tasks
    PAYLOAD = b"x" * size
    results = {"mib": a.mib, "tasks": a.tasks}

    def floor():
        out = [bytearray(PAYLOAD) for _ in range(a.tasks)]
        assert len(out[-1]) == size
    results["floor"] = gbps(timed(floor, a.reps), moved)

    ctx = mp.get_context("fork")
    with ctx.Pool(2) as pool:
        if a.mib <= a.pickle_max_mib:
            def pickle_echo():
                out = pool.map(echo, range(a.tasks), chunksize=1)
                assert len(out[-1]) == size
            results["pickle_echo"] = gbps(timed(pickle_echo, a.reps), moved)

        def shm_copy():
            out = [owned_copy(name) for name in pool.imap(to_shm, range(a.tasks))]
            assert len(out[-1]) == size
        results["shm_copy"] = gbps(timed(shm_copy, a.reps), moved)

    with ctx.Pool(1) as pool:  # one worker holds the stock, as in procpool's bench
        def shm_zero_copy():
            blocks = [shared_memory.SharedMemory(name=n) for n in pool.map(from_stock, range(a.tasks))]
            for block in blocks:
                assert block.buf[size - 1] == ord("x")
                block.close()
                block.unlink()
        results["shm_zero_copy"] = gbps(
            timed(shm_zero_copy, a.reps, prepare=lambda: pool.map(stock_up, range(a.tasks))), moved)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
