"""A run's persistence: its folder and tables (outputs.py), checkpoints (checkpoint.py), adapter
snapshots for the reports (snapshots.py) and exported adapters in PEFT's layout (export.py)."""
