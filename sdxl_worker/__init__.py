"""RunPod serverless worker for SDXL with per-request LoRA adapters.

The folders follow a job's path: ``request`` (1. validate) -> ``sources`` + ``store`` (2. resolve each LoRA into the
shared cache) -> ``weights`` (3. load, 4. apply, 6. restore) -> ``generation`` (5. generate) -> ``output``
(7. encode). ``worker`` walks that path; ``net`` is the networking every fetch shares; ``settings`` reads the
environment.
"""
