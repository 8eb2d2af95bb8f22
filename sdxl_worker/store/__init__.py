"""2. Resolve, keeping: the shared-volume LoRA cache (entries, manifests, locks, leases, eviction, pinning, disk space)."""
