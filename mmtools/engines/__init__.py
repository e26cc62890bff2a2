"""Engines: where the steps run (this process, or a Ray cluster)."""
