"""Denoising progress reaches RunPod through the SDK's progress_update (a local server stands in for RunPod's API)."""

from __future__ import annotations

import json
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from tests.worker_env import PROJECT_ROOT, PYTHON, small_job, subprocess_env

JOB_SCRIPT = """
import asyncio, json, sys, time
import handler
result = asyncio.run(handler.handler({"id": "progress-job", "input": json.loads(sys.argv[1])}))
assert "images" in result, result
time.sleep(3)  # progress_update posts from daemon threads; let them finish
"""


class RecordingApi(BaseHTTPRequestHandler):
    """Records every job-output POST the SDK sends."""

    posts: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.posts.append({"query": parse_qs(urlparse(self.path).query), "body": json.loads(body)})
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def test_denoising_steps_are_reported_with_progress_update(tmp_path, tiny_model_dir):
    server = ThreadingHTTPServer(("127.0.0.1", 0), RecordingApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/job-done/$ID?gpu=test"
    env = subprocess_env(tmp_path / "loras", RUNPOD_WEBHOOK_POST_OUTPUT=url, PROGRESS_INTERVAL_S="0")
    steps = 4
    done = subprocess.run([PYTHON, "-c", JOB_SCRIPT, json.dumps(small_job(num_inference_steps=steps))],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    server.shutdown()
    assert done.returncode == 0, done.stderr[-3000:]
    updates = [post["body"]["output"] for post in RecordingApi.posts if post["body"].get("status") == "IN_PROGRESS"]
    denoising = sorted(update["step"] for update in updates if update.get("phase") == "denoising")
    assert denoising == list(range(1, steps + 1))
    assert all(update["total"] == steps for update in updates if update.get("phase") == "denoising")
