"""LoRA support: request parsing, the shared disk cache, format conversion and exact application."""
