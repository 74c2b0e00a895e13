#!/usr/bin/env bash
# procpool's CPU count under a real one-node Slurm on localhost (Debian's
# slurmctld, slurmd, slurm-client, munge), started here and stopped by pid.
#   slurm_test.sh PROCPOOL_CPUS_TOOL LOCAL_SLURM_SCRIPT
set -euo pipefail
tool=$1
local_slurm=$2
export SLURM_WORKDIR=${SLURM_WORKDIR:-/tmp/procpool-slurm-test}
if ! command -v srun >/dev/null || ! command -v slurmctld >/dev/null; then
  echo "slurm_test: Slurm is not installed (sh tools/install-deps.sh installs it)" >&2
  exit 1
fi
trap 'bash "$local_slurm" stop >/dev/null 2>&1 || true' EXIT
unset PROCPOOL_CPUS
failures=0

expect() {  # expect WANT DESCRIPTION -- COMMAND...
  local want=$1 what=$2
  shift 3
  local got report
  got=$("$@" "$tool" --count)
  report=$("$@" "$tool")
  echo "$what: $report"
  if [ "$got" != "$want" ]; then
    echo "FAIL: $what gave $got, expected $want" >&2
    failures=$((failures + 1))
  fi
}

bash "$local_slurm" stop >/dev/null 2>&1 || true
bash "$local_slurm" start task/affinity
expect 1 "srun -c1 (task/affinity)" -- srun -N1 -n1 -c1
expect 2 "srun -c2 (task/affinity)" -- srun -N1 -n1 -c2
bash "$local_slurm" stop

# No binding: the affinity mask says 2, only Slurm's environment says 1.
bash "$local_slurm" start task/none
expect 1 "srun -c1 (task/none)" -- srun -N1 -n1 -c1
# Two tasks without -c share the node's CPUs: each gets 2 / 2 = 1.
both=$(srun -N1 -n2 "$tool" --count | tr '\n' ' ')
echo "srun -n2 (task/none): $(srun -N1 -n2 "$tool" | head -1)"
if [ "$both" != "1 1 " ]; then
  echo "FAIL: srun -n2 gave '$both', expected '1 1 '" >&2
  failures=$((failures + 1))
fi
bash "$local_slurm" stop
exit $failures
