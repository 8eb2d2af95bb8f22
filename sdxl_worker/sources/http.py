"""The plain URL source: one http(s) download (``net.download``) stored as the entry's ``weights.<ext>``.

The extension comes from the file's content and names (``file_checks.choose_extension``); the name shown is the
server's ``Content-Disposition`` file name, else the last segment of the final or the requested URL. The manifest
records the URL without credentials or secret query parameters (``redact.public_url``).
"""

from __future__ import annotations

from pathlib import Path

from sdxl_worker.net.download import ByteProgress, download_url, url_filename
from sdxl_worker.net.redact import public_url
from sdxl_worker.request.entries import LoraRequest
from sdxl_worker.sources.base import Fetched, Source, first_name, stage_weights
from sdxl_worker.store.file_checks import choose_extension


class HttpSource(Source):
    """``Source`` for ``http://`` and ``https://`` URLs."""

    def fetch(self, request: LoraRequest, work: Path, staged: Path, progress: ByteProgress) -> Fetched:
        """Download the URL into ``staged`` as ``weights.<ext>``."""
        part = work / "download.part"
        info = download_url(request.source, part, self.settings, progress)
        names = (info.filename, url_filename(info.final_url), url_filename(request.source))
        name = stage_weights(part, staged, choose_extension(part, *names))
        return Fetched(kind="file", path=name, weights=name, sha256=info.sha256, display_name=first_name(names),
                       source=public_url(request.source), etag=info.etag)
