#!/usr/bin/env bash
# The deepspeed launcher over a hostfile ("HOST slots=N" lines; it reaches the other hosts by ssh/pdsh).
#   HOSTFILE=launch/hostfile.example bash launch/deepspeed_hostfile.sh configs/zero3.yaml
set -euo pipefail
CONFIG=${1:?usage: launch/deepspeed_hostfile.sh CONFIG.yaml [--set key=value ...]}; shift
exec dist-adapters launch --launcher deepspeed --hostfile "${HOSTFILE:?set HOSTFILE}" \
    --nproc-per-node "${NPROC_PER_NODE:-1}" -- -m dist_adapters.cli train "$CONFIG" "$@"
