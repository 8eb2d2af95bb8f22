"""Denoising progress reaches RunPod through the SDK's progress_update (a local server stands in for RunPod's API)."""

from __future__ import annotations

import json
import subprocess

from tests.support.servers.progress_sink import ProgressSink
from tests.support.worker_env import PROJECT_ROOT, PYTHON, small_job, subprocess_env

JOB_SCRIPT = """
import asyncio, json, sys, time
import handler
result = asyncio.run(handler.handler({"id": "progress-job", "input": json.loads(sys.argv[1])}))
assert "images" in result, result
time.sleep(3)  # progress_update posts from daemon threads; let them finish
"""


def test_denoising_steps_are_reported_with_progress_update(tmp_path, tiny_model_dir):
    steps = 4
    with ProgressSink() as sink:
        env = subprocess_env(tmp_path / "loras", RUNPOD_WEBHOOK_POST_OUTPUT=sink.url, PROGRESS_INTERVAL_S="0")
        done = subprocess.run([PYTHON, "-c", JOB_SCRIPT, json.dumps(small_job(num_inference_steps=steps))],
                              cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
        updates = sink.updates()
    assert done.returncode == 0, done.stderr[-3000:]
    denoising = sorted(update["step"] for update in updates if update.get("phase") == "denoising")
    assert denoising == list(range(1, steps + 1))
    assert all(update["total"] == steps for update in updates if update.get("phase") == "denoising")
