"""Benchmarks of the LoRA worker side by side with the plain diffusers path: ``python -m bench --help``."""
