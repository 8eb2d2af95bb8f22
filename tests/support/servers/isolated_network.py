"""Run as a subprocess: the worker in a private network namespace where a public address and a private one are
both local, with the default rule (``LORA_ALLOW_PRIVATE_HOSTS`` off), so a first hop can be allowed for real and
its redirect to an internal address refused for real.

``python -m tests.support.servers.isolated_network LORA_FILE WORK_DIR``: writes ``WORK_DIR/result.json``.

The namespace (Linux ``unshare``: network and mount, plus a user namespace when not root) has only a loopback
interface, on which ``PUBLIC`` (a global address) and ``INTERNAL`` (a private one) are added; nothing in it can
reach a real network. ``/etc/hosts`` is bind-mounted with names for both, so names resolve through the system
resolver like any DNS answer: ``loras.public.test`` to ``PUBLIC``, ``loras.internal.test`` to ``INTERNAL``.
A LoRA server listens on ``PUBLIC``; an internal server, on all addresses, serves a valid LoRA that a followed
redirect would fetch. When namespaces are not permitted, ``result.json`` holds ``{"unavailable": reason}``.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import socket
import struct
import sys
from pathlib import Path

PUBLIC, INTERNAL = "11.22.33.44", "10.20.30.40"
HOSTS = f"127.0.0.1 localhost\n::1 localhost\n{PUBLIC} loras.public.test\n{INTERNAL} loras.internal.test\n"
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
SIOCGIFFLAGS, SIOCSIFFLAGS, SIOCSIFADDR, IFF_UP = 0x8913, 0x8914, 0x8916, 0x1
_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def enter_namespace(hosts_file: Path) -> None:
    """Unshare network and mounts (with a user namespace when not root), bring up loopback with ``PUBLIC`` and
    ``INTERNAL``, and bind ``hosts_file`` over ``/etc/hosts``. Must run before any thread starts."""
    uid, gid = os.geteuid(), os.getegid()
    if uid == 0 and _libc.unshare(CLONE_NEWNET | CLONE_NEWNS) == 0:
        pass
    else:
        _check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWNS), "unshare")
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
        Path("/proc/self/gid_map").write_text(f"0 {gid} 1")
    _check(_libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
    _check(_libc.mount(str(hosts_file).encode(), b"/etc/hosts", None, MS_BIND, None), "bind /etc/hosts")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as control:
        request = struct.pack("16sH14s", b"lo", 0, b"")
        flags = struct.unpack("16sH14s", fcntl.ioctl(control, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(control, SIOCSIFFLAGS, struct.pack("16sH14s", b"lo", flags | IFF_UP, b""))
        for label, address in ((b"lo:1", PUBLIC), (b"lo:2", INTERNAL)):
            fcntl.ioctl(control, SIOCSIFADDR, struct.pack("16sHH4s8s", label, socket.AF_INET, 0,
                                                          socket.inet_aton(address), b""))


def redirect_targets(port: int) -> dict[str, str]:
    """Where the public server's redirects lead: internal names and addresses in several spellings."""
    return {
        "to-internal-name": f"http://loras.internal.test:{port}/secret.safetensors",
        "to-internal-ip": f"http://{INTERNAL}:{port}/secret.safetensors",
        "to-internal-decimal": f"http://{int.from_bytes(socket.inet_aton(INTERNAL), 'big')}:{port}/secret.safetensors",
        "to-internal-hex": f"http://{hex(int.from_bytes(socket.inet_aton(INTERNAL), 'big'))}:{port}/secret.safetensors",
        "to-loopback": f"http://127.0.0.1:{port}/secret.safetensors",
        "to-localhost": f"http://localhost:{port}/secret.safetensors",
        "to-ipv6-loopback": f"http://[::1]:{port}/secret.safetensors",
        "to-metadata": "http://169.254.169.254/latest/meta-data/iam",
    }


def summary(result: dict) -> dict:
    """A job's error, or how many images it returned."""
    return {"error": result.get("error"), "images": len(result.get("output", {}).get("images", []))}


def run_jobs(lora: bytes, work: Path) -> dict:
    """The worker's answers to each job, what the servers saw, and the cache audit."""
    os.environ.update(SDXL_MODEL="tiny", LORA_CACHE_DIR=str(work / "cache"), LORA_ALLOW_PRIVATE_HOSTS="0")
    import handler
    from tests.support.cache_audit import cache_problems, entry_keys
    from tests.support.servers.fault_http import FaultServer
    from tests.support.worker_env import run_through_sdk, small_job

    with FaultServer(host=PUBLIC) as public, FaultServer(host="0.0.0.0") as internal:
        internal.route("/secret.safetensors", body=lora)
        public.route("/lora.safetensors", body=lora)
        targets = redirect_targets(internal.port)
        for name, target in targets.items():
            public.route(f"/{name}", redirect_to=target)
        public.route("/image-to-internal", redirect_to=targets["to-internal-ip"])
        base = f"http://loras.public.test:{public.port}"
        jobs = {"public-name": [f"{base}/lora.safetensors"],
                "internal-name": [f"http://loras.internal.test:{internal.port}/secret.safetensors"],
                **{name: [{"path": f"{base}/{name}", "name": name}] for name in targets}}
        results = {name: run_through_sdk(handler.handler, small_job(num_inference_steps=1, loras=loras))
                   for name, loras in jobs.items()}
        results["image-url-redirect"] = run_through_sdk(handler.handler,
                                                        small_job(image_url=f"{base}/image-to-internal"))
        results["plain"] = run_through_sdk(handler.handler, small_job(num_inference_steps=1))
        return {"results": {name: summary(result) for name, result in results.items()},
                "targets": targets, "internal_requests": len(internal.requests),
                "public_counts": {name: public.count(f"/{name}") for name in [*targets, "image-to-internal"]},
                "cache_problems": cache_problems(work / "cache"), "entries": len(entry_keys(work / "cache"))}


def main() -> None:
    lora, work = Path(sys.argv[1]).read_bytes(), Path(sys.argv[2])
    hosts = work / "hosts"
    hosts.write_text(HOSTS)
    try:
        enter_namespace(hosts)
    except OSError as error:
        (work / "result.json").write_text(json.dumps({"unavailable": str(error)}))
        return
    (work / "result.json").write_text(json.dumps(run_jobs(lora, work)))


if __name__ == "__main__":
    main()
