"""Networking shared by every fetch (LoRAs and ``image_url``): URL safety, the guarded session, streaming, redaction."""
