"""Test helpers: local HTTP, Hugging Face and progress servers, LoRA-like files, worker and resolver subprocesses."""
