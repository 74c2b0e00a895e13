#!/usr/bin/env bash
# A two-node cluster faked on one host: two slurmd (n1, n2) of a local Slurm
# (tools/local-slurm.sh start2), and `salloc -N2 mpirun --mca btl tcp,self`:
# mpirun starts its daemons through Slurm on both nodes, one rank on each;
# every task reports SLURMD_NODENAME, so the test sees work land on both.
#   slurm_two_nodes_test.sh MPI_NODES_PROGRAM LOCAL_SLURM_SCRIPT
set -euo pipefail
prog=$1
local_slurm=$2
export SLURM_WORKDIR=${SLURM_WORKDIR:-/tmp/procpool-slurm-two-nodes}
if ! command -v salloc >/dev/null || ! command -v slurmctld >/dev/null; then
  echo "slurm_two_nodes_test: Slurm is not installed (sh tools/install-deps.sh installs it)" >&2
  exit 1
fi
trap 'bash "$local_slurm" stop >/dev/null 2>&1 || true' EXIT
bash "$local_slurm" stop >/dev/null 2>&1 || true
bash "$local_slurm" start2 task/none
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 MPI_NODES_EXPECTED=2
out=$(mktemp)
status=0
timeout -k 5 120 salloc -N2 --overcommit \
  mpirun -n 2 --map-by node --bind-to none --mca btl tcp,self "$prog" >"$out" 2>&1 || status=$?
grep -E "mpi_nodes|FAILED|rror" "$out" || true
rm -f "$out"
if [ "$status" != 0 ]; then
  echo "slurm_two_nodes_test: FAIL: the job exited with $status" >&2
  exit 1
fi
echo "slurm_two_nodes_test: OK"
