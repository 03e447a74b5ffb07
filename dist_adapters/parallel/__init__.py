"""Engine integrations, one file per engine (fsdp.py, deepspeed.py, tensor.py); gather.py is the
single context through which anything reads or writes a full base weight (shard rule 3)."""
