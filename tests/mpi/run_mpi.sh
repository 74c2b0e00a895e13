#!/usr/bin/env bash
# Runs an MPI test program under a real mpirun on this host, bounded in time.
#   run_mpi.sh [--ranks N] [--within S] [--expect-fail REGEX] [--expect REGEX]
#              [--bind-to WHAT] [--mpmd PROGRAM2] PROGRAM [ARGS...]
# --interrupt-after S sends SIGINT (Ctrl-C) to the launcher after S seconds.
# --ranks 0 runs PROGRAM without mpirun (a plain ./app). Without --expect-fail
# the job must exit 0; with it, the job must exit non-zero within S seconds and
# its output must match REGEX. Either way no process of PROGRAM may be left
# behind a few seconds after the job ends. --bind-to: mpirun's binding
# (default none, see below; `default` leaves mpirun's own). --mpmd: one more
# rank, running PROGRAM2 (`mpirun -n N PROGRAM : -n 1 PROGRAM2`).
set -uo pipefail
ranks=3 within=60 expect_fail="" expect="" interrupt="" bind_to=none mpmd=()
while [ $# -gt 0 ]; do
  case $1 in
    --ranks) ranks=$2; shift 2 ;;
    --within) within=$2; shift 2 ;;
    --expect-fail) expect_fail=$2; shift 2 ;;
    --expect) expect=$2; shift 2 ;;
    --interrupt-after) interrupt=$2; shift 2 ;;
    --bind-to) bind_to=$2; shift 2 ;;
    --mpmd) mpmd=(: -n 1 "$2"); shift 2 ;;
    *) break ;;
  esac
done
prog=$1
shift
# Open MPI 4.1 refuses root without these (CI runs as root); --oversubscribe:
# more ranks than cores on a 2-core box; --bind-to none: each rank sees every
# core, so its usable_cpu_count() (and its pool's worker count) is realistic.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
out=$(mktemp)
trap 'rm -f "$out"' EXIT
# A job still running after $within s hangs: before it is killed (at $limit)
# every process of it prints its threads' stacks (gdb, when installed), so a
# rare hang in CI says where it was.
dump_budget=40
limit=$((within + dump_budget))
start=$(date +%s%N)
if [ "$ranks" = 0 ]; then
  timeout -k 5 "$limit" "$prog" "$@" >"$out" 2>&1 &
else
  binding=(--bind-to "$bind_to")
  [ "$bind_to" = default ] && binding=()
  timeout -k 5 "$limit" mpirun -n "$ranks" --oversubscribe ${binding[@]+"${binding[@]}"} \
    "$prog" "$@" ${mpmd[@]+"${mpmd[@]}"} >"$out" 2>&1 &
fi
job=$!
stacks_if_hung() {
  sleep "$within" >/dev/null 2>&1  # not holding ctest's pipe once killed
  if command -v gdb >/dev/null; then
    echo "run_mpi: still running after ${within}s; the stacks of its processes:" >&2
    for pid in $(pgrep -f -- "^$prog( |\$)"); do
      local name
      name=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c1-60)
      timeout -k 2 $((dump_budget - 8)) gdb -p "$pid" -batch -nx -ex 'thread apply all bt' 2>&1 |
        grep -E '^(Thread|#)' | sed "s|^|[$pid $name] |" >&2 &
    done
    wait
  fi
  kill -TERM "$job" 2>/dev/null  # timeout passes it on to mpirun
}
# (In a process group of its own, so that its gdb runs end with it.)
set -m
stacks_if_hung &
watcher=$!
set +m
if [ -n "$interrupt" ]; then
  # Ctrl-C: timeout passes SIGINT on to mpirun, which passes it to every rank.
  sleep "$interrupt"
  kill -INT "$job"
fi
wait "$job"
rc=$?
kill -- -"$watcher" 2>/dev/null
wait "$watcher" 2>/dev/null
elapsed_ms=$((($(date +%s%N) - start) / 1000000))
elapsed=$((elapsed_ms / 1000)).$(printf %03d $((elapsed_ms % 1000)))
tail -n 60 "$out"
echo "run_mpi: exit status $rc after ${elapsed}s"
fail=0
# timeout says 124 (or 137 after -k); mpirun itself says 137 when a rank was
# SIGKILLed, so only the time tells a hang.
if [ "$elapsed_ms" -ge $((within * 1000)) ]; then
  echo "run_mpi: FAIL: the job did not end within ${within}s (a hang)" >&2
  fail=1
elif [ -n "$expect_fail" ]; then
  if [ "$rc" = 0 ]; then
    echo "run_mpi: FAIL: the job should have failed" >&2
    fail=1
  elif ! grep -Eq -- "$expect_fail" "$out"; then
    echo "run_mpi: FAIL: the output does not say /$expect_fail/" >&2
    fail=1
  fi
elif [ "$rc" != 0 ]; then
  echo "run_mpi: FAIL: exit status $rc" >&2
  fail=1
fi
if [ -n "$expect" ] && ! grep -Eq -- "$expect" "$out"; then
  echo "run_mpi: FAIL: the output does not say /$expect/" >&2
  fail=1
fi
# Nothing of the job may outlive it (ranks, their forked workers: their
# command lines start with the program; this script's, and its subshells',
# name it later).
left() { pgrep -f -- "^$prog( |\$)"; }
for _ in $(seq 50); do
  left >/dev/null || break
  sleep 0.1
done
if left >/dev/null; then
  echo "run_mpi: FAIL: processes left behind:" >&2
  ps -o pid,args -p "$(left | paste -sd,)" >&2
  fail=1
fi
exit $fail
