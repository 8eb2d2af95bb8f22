"""Civitai's REST API on a ``FaultServer``: ``/api/v1/model-versions/<id>`` answers JSON shaped like
civitai.com's, ``/api/download/models/<id>`` redirects to the file on "storage" (the same server under another
host name, ``localhost``, so that a token must not follow the redirect). Point ``CIVITAI_API_BASE`` at ``base``."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from tests.support.servers.fault_http import FaultServer


class FakeCivitai:
    """``civitai = FakeCivitai(server); civitai.add_version(368189, lora_bytes())``."""

    def __init__(self, server: FaultServer) -> None:
        self.server = server

    @property
    def base(self) -> str:
        return self.server.url("")

    @staticmethod
    def api_path(version_id: int) -> str:
        return f"/api/v1/model-versions/{version_id}"

    @staticmethod
    def download_path(version_id: int) -> str:
        return f"/api/download/models/{version_id}"

    @staticmethod
    def storage_path(version_id: int, name: str) -> str:
        return f"/storage/{version_id}/{name}"

    def file_entry(self, version_id: int, body: bytes, name: str = "pixel-style.safetensors", primary: bool = True,
                   fmt: str = "SafeTensor", **overrides: Any) -> dict[str, Any]:
        """One ``files[]`` item for ``body``, served at a storage path; its download URL asks for it by format."""
        sha = hashlib.sha256(body).hexdigest().upper()
        download = self.download_path(version_id)
        self.server.route(self.storage_path(version_id, name), body=body,
                          headers={"Content-Disposition": f'attachment; filename="{name}"'})
        if primary:
            self.server.route(download, redirect_to=self.server.url(self.storage_path(version_id, name), "localhost"))
        return {"id": version_id * 10 + (0 if primary else 1), "name": name, "sizeKB": len(body) / 1024,
                "type": "Model", "metadata": {"fp": "fp16", "size": "full", "format": fmt},
                "pickleScanResult": "Success", "virusScanResult": "Success", "scannedAt": "2024-02-12T22:45:53.210Z",
                "hashes": {"AutoV2": sha[:10], "SHA256": sha, "CRC32": "F500AADD", "BLAKE3": "E7" * 32},
                "primary": primary, "downloadUrl": self.server.url(download), **overrides}

    def add_version(self, version_id: int, body: bytes, *, model_id: int = 328553, base_model: str = "SDXL 1.0",
                    model_type: str = "LORA", trained_words: list[str] | None = None,
                    files: list[dict[str, Any]] | None = None, **file_overrides: Any) -> dict[str, Any]:
        """Serve one model version whose primary file is ``body`` (or exactly ``files``); returns the JSON."""
        payload = {
            "id": version_id, "modelId": model_id, "name": "v1.0", "createdAt": "2024-02-12T22:44:01.442Z",
            "trainedWords": ["pixel art", "8-bit"] if trained_words is None else trained_words,
            "baseModel": base_model, "earlyAccessTimeFrame": 0, "description": None,
            "stats": {"downloadCount": 1, "ratingCount": 0, "rating": 0},
            "model": {"name": "Pixel Style", "type": model_type, "nsfw": False, "poi": False},
            "files": files if files is not None else [self.file_entry(version_id, body, **file_overrides)],
            "images": [], "downloadUrl": self.server.url(self.download_path(version_id)),
        }
        self.server.route(self.api_path(version_id), body=json.dumps(payload).encode(),
                          headers={"Content-Type": "application/json"})
        return payload
