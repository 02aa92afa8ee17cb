"""Worker-process tuning for CPU pools: the start method, OpenCV threads, and glibc's allocator."""

from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.context

import cv2

POOL_JOBS = "PNEUMOTHORAX_POOL_JOBS"
"""How many jobs the GPU pool runs at once (set for each job it starts): ``data.workers: auto`` shares the cores."""


def single_threaded_opencv() -> None:
    """One OpenCV thread in this process and in the processes it forks from now on.

    Call it in the parent *before* starting worker processes: ``cv2.setNumThreads`` called inside
    a forked child, after the parent used OpenCV's thread pool, deadlocks waiting for threads
    that were not copied (seen with DataLoader and prepare workers). Forked children inherit the
    setting, so N workers run N threads, not N x cores. torch limits its own threads in
    DataLoader workers.
    """
    cv2.setNumThreads(1)


def mp_context() -> multiprocessing.context.BaseContext:
    """Multiprocessing context for CPU pools: fork where available (no re-import of __main__)."""
    return multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")


def steady_malloc(mmap_threshold: int = 32 << 20, trim_threshold: int = 128 << 20) -> bool:
    """Let glibc's ``malloc`` keep freed image-sized blocks in the heap (call in worker processes).

    glibc serves a block of 128 KB or more with a fresh ``mmap`` and unmaps it on ``free``; its
    dynamic threshold only grows past a size once a *larger* block is freed. A loop that
    decodes one 1024x1024 image after another then pays 256 page faults per image: a bare
    ``dicom.read`` loop ran at 255 images/s here, and at 440 with these settings. Returns
    False where ``mallopt`` does not exist (not glibc), changing nothing.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, mmap_threshold)) and bool(mallopt(m_trim_threshold, trim_threshold))
