#!/usr/bin/env bash
# OpenMPI's mpirun (one process per slot of the hostfile, or NPROC on this machine).
#   HOSTFILE=launch/hostfile.example bash launch/mpirun.sh configs/demo.yaml
#   NPROC=2 bash launch/mpirun.sh configs/demo.yaml
set -euo pipefail
CONFIG=${1:?usage: launch/mpirun.sh CONFIG.yaml [--set key=value ...]}; shift
if [ -n "${HOSTFILE:-}" ]; then
  exec dist-adapters launch --launcher mpirun --hostfile "$HOSTFILE" -- -m dist_adapters.cli train "$CONFIG" "$@"
fi
exec dist-adapters launch --launcher mpirun --nproc-per-node "${NPROC:-2}" -- -m dist_adapters.cli train "$CONFIG" "$@"
