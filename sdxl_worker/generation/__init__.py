"""5. Generate: the SDXL pipelines (which weights, loaded once), the pipeline call, progress updates."""
