"""Say what a failed write to the LoRA cache folder means for the person running the endpoint."""

from __future__ import annotations

import errno
from pathlib import Path

_FULL = {errno.ENOSPC: "is full", errno.EDQUOT: "is over its disk quota",
         errno.EFBIG: "cannot store a file this large (a file size limit of the volume or the process)"}
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def describe_disk_error(error: OSError, root: Path) -> str:
    """A message naming the cache folder and the problem: full, read-only, or another I/O error."""
    cause = error.strerror or type(error).__name__
    if error.errno in _FULL:
        return (f"the LoRA cache folder {root} {_FULL[error.errno]}: {cause}; free space on the volume or set "
                "LORA_CACHE_MAX_GB below its size")
    if error.errno in _NOT_WRITABLE:
        return (f"the LoRA cache folder {root} is not writable: {cause}; check LORA_CACHE_DIR and how the volume is "
                "mounted")
    return f"LoRA cache I/O error in {root} ({type(error).__name__}: {cause})"
