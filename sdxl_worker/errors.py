"""Error types that end a job with a clear ``{"error": ...}`` instead of a traceback."""


class JobError(Exception):
    """A job cannot be served; the message is shown to the caller as is and must name the cause."""


class InputError(JobError):
    """The job's input is invalid; raised before any download or model work."""


class LoraError(JobError):
    """A LoRA could not be fetched, verified, parsed or applied; the message names the LoRA."""
