"""What the tests share: settings and worker factories (``factories``), job helpers (``worker_env``), LoRA files in
every form (``lora_forms``), weight snapshots (``weights``), the cache auditor (``cache_audit``) and local servers
(``servers``: HTTP faults, a fake Hugging Face Hub, a fake Civitai, a progress sink)."""
