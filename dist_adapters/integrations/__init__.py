"""Glue for training loops we do not own: ``integrations.transformers`` (Trainer, TRL)."""
