"""3-4, 6. Load, apply, restore: a cached file -> per-module adapters (RAM cache, metadata) -> fused into the weights and back."""
