"""Checkpoints: the Orbax manager, and reading a run's directory."""
