"""Test helpers: local HTTP and Hugging Face servers, LoRA-like files, a subprocess resolver."""
