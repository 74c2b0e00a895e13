#!/usr/bin/env bash
# procpool::mpi launched by Slurm: `srun --mpi=pmix` on a real one-node Slurm
# on localhost (tools/local-slurm.sh), started here and stopped by pid.
# (Two slurmd on one host collide under srun -N2 --mpi=pmix: one node here.)
#   slurm_mpi_test.sh MPI_CALLS_PROGRAM LOCAL_SLURM_SCRIPT
set -euo pipefail
prog=$1
local_slurm=$2
export SLURM_WORKDIR=${SLURM_WORKDIR:-/tmp/procpool-slurm-mpi-test}
if ! command -v srun >/dev/null || ! command -v slurmctld >/dev/null; then
  echo "slurm_mpi_test: Slurm is not installed (sh tools/install-deps.sh installs it)" >&2
  exit 1
fi
trap 'bash "$local_slurm" stop >/dev/null 2>&1 || true' EXIT
bash "$local_slurm" stop >/dev/null 2>&1 || true
# task/none: no CPU binding, so each rank's usable_cpu_count() is the node's.
bash "$local_slurm" start task/none
# Three ranks on a node with fewer CPUs: --overcommit.
timeout -k 5 120 srun -n 3 --overcommit --mpi=pmix "$prog" 2>&1 | tail -n 5
status=${PIPESTATUS[0]}
if [ "$status" != 0 ]; then
  echo "slurm_mpi_test: FAIL: srun --mpi=pmix exited with $status" >&2
  exit 1
fi
echo "slurm_mpi_test: OK"
