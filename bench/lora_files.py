"""The LoRAs the benchmarks use, generated in kohya format, and a plain local HTTP server for the cold tier."""

from __future__ import annotations

import functools
import threading
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from tools.synthetic_lora import write_kohya_lora

DOWNLOAD_PAYLOAD_BYTES = {"quick": 64 * 1024**2, "full": 256 * 1024**2}


def write_bench_loras(pipe, folder: Path, full: bool, cycle_count: int) -> dict[str, Path]:
    """``rank32_unet`` (UNet attention), ``rank128_all`` (UNet + both text encoders), ``cycle_<i>`` files, and a
    ``download_payload`` large enough to measure throughput."""
    unet = {"unet": pipe.unet}
    everything = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    files = {
        "rank32_unet": write_kohya_lora(folder / "rank32_unet.safetensors", unet, rank=32, seed=1, up_std=1e-3),
        "rank128_all": write_kohya_lora(folder / "rank128_all.safetensors", everything, rank=128, seed=2,
                                        up_std=1e-3),
    }
    payload_bytes = DOWNLOAD_PAYLOAD_BYTES["full" if full else "quick"]
    payload = torch.randn(payload_bytes // 4, generator=torch.Generator().manual_seed(3))
    files["download_payload"] = folder / "download_payload.safetensors"
    save_file({"payload": payload}, str(files["download_payload"]))
    cycle_rank = 8 if full else 4
    for index in range(cycle_count):
        files[f"cycle_{index}"] = write_kohya_lora(folder / f"cycle_{index}.safetensors", unet, rank=cycle_rank,
                                                   seed=100 + index, up_std=1e-3)
    return files


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """Serve ``folder`` over HTTP on 127.0.0.1; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
