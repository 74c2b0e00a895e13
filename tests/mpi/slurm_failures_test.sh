#!/usr/bin/env bash
# What goes wrong on a cluster, under Slurm for real: `srun --mpi=pmix -n 3`
# on a one-node local Slurm (tools/local-slurm.sh), each case bounded in time
# and leaving no process of the program behind (ranks, their workers):
#   kill_rank   rank 1 is killed mid-call: the step ends, non-zero
#   stop_rank   rank 1 stops (PROCPOOL_MPI_NODE_TIMEOUT=2): the root gives up
#               on it and ends the job with MPI_Abort, non-zero, naming it
#   stop_rank_abort_hangs  the same with an MPI_Abort that never returns: the
#               root cancels its job step after 10 s (scancel)
#   root_stops  the root stops (PROCPOOL_MPI_ROOT_TIMEOUT=2): its nodes end
#               the job, non-zero, saying so
#   scancel     the job is cancelled mid-call: every rank and worker is gone
#   slurm_failures_test.sh MPI_FAILURES_PROGRAM LOCAL_SLURM_SCRIPT
set -uo pipefail
prog=$1
local_slurm=$2
export SLURM_WORKDIR=${SLURM_WORKDIR:-/tmp/procpool-slurm-failures-test}
if ! command -v srun >/dev/null || ! command -v slurmctld >/dev/null; then
  echo "slurm_failures_test: Slurm is not installed (sh tools/install-deps.sh installs it)" >&2
  exit 1
fi
out=$(mktemp)
trap 'bash "$local_slurm" stop >/dev/null 2>&1 || true; rm -f "$out"' EXIT
bash "$local_slurm" stop >/dev/null 2>&1 || true
# task/none: no CPU binding, so each rank's usable_cpu_count() is the node's.
bash "$local_slurm" start task/none || exit 1
failed=0
fail() {
  echo "slurm_failures_test: FAIL: $*" >&2
  tail -n 15 "$out" >&2
  failed=1
}
now_ms() { echo $(($(date +%s%N) / 1000000)); }
left() { pgrep -f -- "^$prog( |\$)"; }
# Nothing of the program may be left a few seconds after its job ended.
check_nothing_left() {
  for _ in $(seq 50); do
    left >/dev/null || return 0
    sleep 0.1
  done
  fail "$1: processes left behind: $(left | paste -sd' ')"
  pkill -9 -f -- "^$prog( |\$)"
}

# expect_failure NAME WITHIN REGEX [VAR=VALUE...]: the job must end non-zero
# within WITHIN seconds and say REGEX.
expect_failure() {
  local name=$1 within=$2 regex=$3
  shift 3
  local start status
  start=$(now_ms)
  env "$@" timeout -k 5 "$within" srun -n 3 --overcommit --mpi=pmix "$prog" "$name" >"$out" 2>&1
  status=$?
  local took=$(($(now_ms) - start))
  echo "slurm_failures_test: $name: status $status after ${took} ms"
  if [ "$took" -ge $((within * 1000)) ]; then
    fail "$name: the job did not end within ${within}s"
  elif [ "$status" = 0 ]; then
    fail "$name: the job should have failed"
  elif ! grep -Eq -- "$regex" "$out"; then
    fail "$name: the output does not say /$regex/"
  fi
  check_nothing_left "$name"
}

expect_failure kill_rank 20 "task 1: Killed|rank 1"
expect_failure stop_rank 40 "node [^ ]+:1 has not answered" PROCPOOL_MPI_NODE_TIMEOUT=2
# The same with an MPI_Abort that never returns (the program's own, through
# MPI's profiling interface): after 10 s the root cancels its job step, rank 1
# still stopped (it is continued after 30 s). The root exiting alone would
# not do (srun waits for the stopped rank): were scancel to fail, the job
# would not end within 28 s.
expect_failure stop_rank_abort_hangs 28 \
  "MPI_Abort did not end the job within 10 s; cancelling Slurm step [0-9]+\.[0-9]+ \(scancel\)" \
  PROCPOOL_MPI_NODE_TIMEOUT=2
expect_failure root_stops 20 "rank [12] on [^ ]+: the root \(rank 0\) has not answered" \
  PROCPOOL_MPI_ROOT_TIMEOUT=2

# scancel: once the ranks run the call, the job is cancelled by its name.
start=$(now_ms)
timeout -k 5 60 srun -J procpool-scancel-test -n 3 --overcommit --mpi=pmix "$prog" long \
  >"$out" 2>&1 &
job=$!
for _ in $(seq 200); do
  grep -q "mpi_failures long: running" "$out" && break
  sleep 0.1
done
if ! grep -q "mpi_failures long: running" "$out"; then
  fail "scancel: the job did not start within 20 s"
fi
cancelled=$(now_ms)
scancel -n procpool-scancel-test
wait "$job"
status=$?
took=$(($(now_ms) - cancelled))
echo "slurm_failures_test: scancel: srun ended with status $status ${took} ms after scancel"
if [ "$took" -ge 15000 ]; then
  fail "scancel: srun took ${took} ms to end"
elif [ "$status" = 0 ]; then
  fail "scancel: the job should have failed"
fi
check_nothing_left scancel

[ "$failed" = 0 ] && echo "slurm_failures_test: OK"
exit "$failed"
