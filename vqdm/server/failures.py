"""What a failed batch means for its jobs and for the process: out-of-memory (free, split, retry),
a device error that poisons the CUDA context (the process must restart), or anything else (the
job fails; the server carries on). Clients get the short code, the log gets the trace."""
from __future__ import annotations

import gc

# Job.error codes, each answered with a fixed short message (routes._outcome_error).
INSUFFICIENT_MEMORY = "insufficient_memory"
GENERATION_FAILED = "generation_failed"
WORKER_UNHEALTHY = "worker_unhealthy"
INTERNAL_ERROR = "internal_error"

# Substrings of errors after which a CUDA context cannot be trusted again (sticky errors).
_POISON_MARKERS = ("CUDA error", "cuDNN error", "CUBLAS_STATUS_EXECUTION_FAILED", "device-side assert",
                   "illegal memory access", "unspecified launch failure")


def is_out_of_memory(e: BaseException) -> bool:
    import torch

    text = str(e).lower()
    # CUDA: torch.OutOfMemoryError; CPU: the default allocator's RuntimeError.
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def poisons_device(e: BaseException) -> bool:
    """A sticky device error: every later kernel on the context fails too, so only a restart helps."""
    import torch

    if is_out_of_memory(e):
        return False
    accel = getattr(torch, "AcceleratorError", None)
    return (accel is not None and isinstance(e, accel)) or any(m in str(e) for m in _POISON_MARKERS)


def free_memory() -> None:
    """After an OOM: drop the failed batch's tensors (the traceback held them) and return cached
    blocks to the driver, so a smaller retry starts from a clean allocator."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
