"""The floor every stage stands on: one-line user errors, atomic files and JSON, checkpoints, the
dataclass configs with YAML and typed overrides, torch's threads, torch.distributed helpers, and
the one training loop every trained model goes through. Imports nothing else of dmde."""
