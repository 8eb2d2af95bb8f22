"""Run as a subprocess: one worker (``handler.handler``) serves the job inputs of a JSON file, in order, through the
runpod SDK's ``run_job``, and writes the results as a JSON list.

``python -m tests.support.servers.job_runner JOBS_JSON OUT_JSON [--go GO_FILE] [--no-dac-override]``. The worker is
configured by the environment (``tests.support.worker_env.subprocess_env``). With ``--go``, the worker loads its models,
writes ``OUT_JSON.ready`` and waits for ``GO_FILE`` to exist before the first job, so that a test can start several
workers at once and release them in the order it needs. With ``--no-dac-override``, a root process first drops the
capabilities that let it ignore file permissions (``CAP_DAC_OVERRIDE``, ``CAP_DAC_READ_SEARCH``, ``CAP_FOWNER``) from
its bounding set and executes itself again without them, so that folder modes bind it as they bind any other user:
a folder made read-only with ``chmod`` is then read-only for this worker even on a CI machine that runs as root.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from pathlib import Path

PR_CAPBSET_DROP = 24
PERMISSION_OVERRIDES = (1, 2, 3)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
NO_DAC_OVERRIDE = "--no-dac-override"


def drop_permission_overrides_and_reexec(args: list[str]) -> None:
    """As root: remove the permission-override capabilities from the bounding set, then exec ``args`` again."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in PERMISSION_OVERRIDES:
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"cannot drop capability {capability}: {os.strerror(code)}")
    os.execv(sys.executable, [sys.executable, "-m", "tests.support.servers.job_runner", *args])


def main() -> None:
    args = [arg for arg in sys.argv[1:] if arg != NO_DAC_OVERRIDE]
    if NO_DAC_OVERRIDE in sys.argv and os.geteuid() == 0:
        drop_permission_overrides_and_reexec(args)
    parser = argparse.ArgumentParser()
    parser.add_argument("jobs", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--go", type=Path)
    options = parser.parse_args(args)

    import handler
    from tests.support.worker_env import run_through_sdk

    handler.configure_logging()
    if options.go is not None:
        handler.get_worker()
        options.out.with_name(options.out.name + ".ready").touch()
        while not options.go.exists():
            time.sleep(0.01)
    jobs = json.loads(options.jobs.read_text())
    results = [run_through_sdk(handler.handler, job, job_id=f"job-{index}") for index, job in enumerate(jobs)]
    options.out.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
