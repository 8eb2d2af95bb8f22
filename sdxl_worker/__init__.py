"""RunPod serverless worker for SDXL with per-request LoRA adapters.

A job's path: validate (``validation``) -> resolve LoRAs into the shared cache (``lora.cache``) ->
apply them to the pipeline (``lora.patcher``) -> generate (``generation``) -> restore -> encode output (``output``).
"""
