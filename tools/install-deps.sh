#!/bin/sh
# Installs everything procpool's build, tests, demo and benchmarks need on
# Debian 12, as root. Safe to run again.
set -eu
export DEBIAN_FRONTEND=noninteractive
packages="g++ cmake ninja-build pkg-config libcereal-dev libgtest-dev libgmock-dev \
  libbenchmark-dev clang libclang-rt-14-dev slurmctld slurmd slurm-client munge tmux procps python3 gdb \
  openmpi-bin libopenmpi-dev python3-mpi4py"
missing=""
for p in $packages; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  apt-get update -q
  apt-get install -y -q --no-install-recommends $missing
fi
