"""The worker as RunPod users run it: `python handler.py --test_input`, test_input.json, and --rp_serve_api over HTTP."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import requests

from tests.support.worker_env import (PROJECT_ROOT, PYTHON, image_from_png, local_api, png_from_data_uri,
                                      run_through_sdk, small_job, subprocess_env)


def run_handler_cli(args: list[str], cwd, env) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, str(PROJECT_ROOT / "handler.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_test_input_flag_runs_one_job(tmp_path, tiny_model_dir):
    job = json.dumps({"input": small_job()})
    done = run_handler_cli(["--test_input", job], tmp_path, subprocess_env(tmp_path / "loras"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "completed successfully" in done.stdout + done.stderr


def test_test_input_flag_with_bad_input_exits_non_zero_naming_the_field(tmp_path, tiny_model_dir):
    job = json.dumps({"input": small_job(width=1001)})
    done = run_handler_cli(["--test_input", job], tmp_path, subprocess_env(tmp_path / "loras"))
    assert done.returncode == 1
    assert "width: must be" in done.stdout + done.stderr


def test_test_input_flag_runs_a_cache_action(tmp_path, tiny_model_dir):
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "hand.safetensors").write_bytes(b"x")
    job = json.dumps({"input": {"action": "cache_stats"}})
    done = run_handler_cli(["--test_input", job], tmp_path, subprocess_env(tmp_path / "loras"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "completed successfully" in done.stdout + done.stderr
    log = done.stdout + done.stderr
    assert "'action': 'cache_stats', 'disk': {" in log and "'user_entries': 1" in log


def test_test_input_json_in_working_folder(tmp_path, tiny_model_dir):
    shutil.copy(PROJECT_ROOT / "test_input.json", tmp_path / "test_input.json")
    done = run_handler_cli([], tmp_path, subprocess_env(tmp_path / "loras"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Using test_input.json as job input" in done.stdout + done.stderr


@pytest.fixture(scope="module")
def local_api_url(tmp_path_factory, tiny_model_dir):
    """`python handler.py --rp_serve_api` on a free port: the runpod SDK's own local FastAPI server."""
    folder = tmp_path_factory.mktemp("api")
    with local_api(folder, subprocess_env(folder / "loras")) as (base, _):
        yield base


def test_runsync_over_http_returns_the_same_image_as_in_process(local_api_url, worker_handler):
    response = requests.post(local_api_url + "/runsync", json={"input": small_job(seed=21)}, timeout=300)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "COMPLETED", body
    image = png_from_data_uri(body["output"]["images"][0])
    assert image_from_png(image).size == (64, 64)
    in_process = run_through_sdk(worker_handler, small_job(seed=21))["output"]["images"][0]
    assert png_from_data_uri(in_process) == image


def test_run_then_status_over_http(local_api_url):
    submitted = requests.post(local_api_url + "/run", json={"input": small_job(seed=5, num_images=2)},
                              timeout=30).json()
    assert submitted["status"] == "IN_PROGRESS"
    body = requests.post(f"{local_api_url}/status/{submitted['id']}", timeout=300).json()
    assert body["status"] == "COMPLETED", body
    assert len(body["output"]["images"]) == 2 and body["output"]["seed"] == 5


def test_bad_job_over_http_fails_with_the_field_named_and_the_server_keeps_serving(local_api_url):
    body = requests.post(local_api_url + "/runsync", json={"input": small_job(scheduler="nope")}, timeout=60).json()
    assert body["status"] == "FAILED" and "scheduler" in body["error"]
    body = requests.post(local_api_url + "/runsync", json={"input": small_job()}, timeout=300).json()
    assert body["status"] == "COMPLETED"


def test_cache_actions_over_http_and_a_bad_action_named(local_api_url):
    body = requests.post(local_api_url + "/runsync", json={"input": {"action": "list_loras"}}, timeout=60).json()
    assert body["status"] == "COMPLETED", body
    assert {"entries", "hand_placed", "aliases", "cache_dir"} <= set(body["output"])
    body = requests.post(local_api_url + "/runsync", json={"input": {"action": "list_loras", "loras": ["x"]}},
                         timeout=60).json()
    assert body["status"] == "FAILED" and "loras is not a valid input option" in body["error"]
