#!/usr/bin/env bash
# Multi-node torchrun (c10d rendezvous): run one line per node, same MASTER on all.
#   node 0:  NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash launch/torchrun_multinode.sh configs/fsdp2.yaml
#   node 1:  NODE_RANK=1 MASTER_ADDR=10.0.0.1 LOCAL_ADDR=10.0.0.2 bash launch/torchrun_multinode.sh configs/fsdp2.yaml
# NNODES (2), NPROC_PER_NODE (1: set it to the GPUs per node), MASTER_PORT (29500), MAX_RESTARTS (0).
set -euo pipefail
CONFIG=${1:?usage: launch/torchrun_multinode.sh CONFIG.yaml [--set key=value ...]}; shift
exec dist-adapters launch --launcher torchrun --nnodes "${NNODES:-2}" --node-rank "${NODE_RANK:?set NODE_RANK}" \
    --master-addr "${MASTER_ADDR:?set MASTER_ADDR}" --master-port "${MASTER_PORT:-29500}" \
    ${LOCAL_ADDR:+--local-addr "$LOCAL_ADDR"} --nproc-per-node "${NPROC_PER_NODE:-1}" \
    --max-restarts "${MAX_RESTARTS:-0}" -- -m dist_adapters.cli train "$CONFIG" "$@"
