"""The job input schema, at the top level where RunPod users look for it (``INPUT_SCHEMA`` in the runpod SDK's
``rp_validator`` format, and one schema per cache action). It lives in ``sdxl_worker/request/schema.py``, the
validation stage of the package; this module re-exports it."""

from sdxl_worker.request.schema import (ACTION_SCHEMAS, ACTIONS, INPUT_SCHEMA, MAX_ACTION_LORAS, MAX_IMAGES,
                                        MAX_PROMPT_CHARS, SCHEDULERS)

__all__ = ["ACTION_SCHEMAS", "ACTIONS", "INPUT_SCHEMA", "MAX_ACTION_LORAS", "MAX_IMAGES", "MAX_PROMPT_CHARS",
           "SCHEDULERS"]
