"""A plain torch script written for torchrun (no dist_adapters import): it reads the torchrun
environment, joins a gloo group through env://, all-reduces its rank + 1 and writes what it saw
to OUT.rank<R>.json. tests/test_launcher.py runs it under every launcher."""

import json
import os
import sys

import torch
import torch.distributed as dist

KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
seen = {key: os.environ.get(key) for key in KEYS}
dist.init_process_group("gloo")
value = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(value)
with open(f"{sys.argv[1]}.rank{dist.get_rank()}.json", "w", encoding="utf-8") as fh:
    json.dump({"env": seen, "sum": value.item(), "rank": dist.get_rank(), "world": dist.get_world_size(),
               "argv": sys.argv[1:], "main": __name__}, fh)
dist.destroy_process_group()
