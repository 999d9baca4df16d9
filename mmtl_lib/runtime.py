"""Where and how computations run: device, threads, allocator, precision, seeded generators, and
the name of the machine a number was measured on."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .errors import ConfigError


def default_device() -> torch.device:
    """CUDA when present, else Apple's MPS when present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def set_threads(n: int | None = None) -> int:
    """Set torch's intra-op thread count and return it.

    ``n`` defaults to the environment variable ``MMTL_THREADS``, else 1. One thread is the safe
    choice on small machines: with two cores and another busy process, torch's default of two
    OpenMP threads made elementwise ops about 20x slower than one thread (the threads wait for
    each other). On a free many-core machine raise it.
    """
    if n is None:
        n = int(os.environ.get("MMTL_THREADS", "1"))
    if n < 1:
        raise ConfigError(f"n = {n} is not allowed: the thread count must be >= 1")
    torch.set_num_threads(n)
    return n


def keep_freed_memory() -> bool:
    """Let glibc's ``malloc`` keep freed memory for reuse rather than hand it back to the kernel.

    Why: a meta-iteration on the CPU allocates and frees the same large temporaries every time
    (under :func:`torch.func.vmap`, whole-meta-batch activations and their gradients). glibc serves
    big blocks with ``mmap`` and unmaps them on ``free``, and it trims the heap's top, so each
    iteration pays the page faults and zeroing again. Raising the mmap and trim thresholds and
    padding the heap keeps those pages in the process. ``benchmarks/allocator.py`` measured 1.05x
    tasks/s for the ``cpu`` preset and 1.22x for the paper's 5-way 1-shot set-up; the cost is
    that the process keeps its peak heap. Returns ``True`` where it applied (Linux with glibc) and
    ``False`` elsewhere (macOS, Windows, musl), where it changes nothing.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # glibc's malloc.h
    # Some glibc versions refuse mmap thresholds above 32 MiB; that still covers the cpu preset.
    mmap = mallopt(m_mmap_threshold, 1 << 30) == 1 or mallopt(m_mmap_threshold, 32 << 20) == 1
    return mmap and mallopt(m_trim_threshold, 1 << 30) == 1 and mallopt(m_top_pad, 256 << 20) == 1


def generator(seed: int, device="cpu") -> torch.Generator:
    """A seeded generator, so that a run is repeatable without touching the global RNG."""
    return torch.Generator(device=device).manual_seed(int(seed))


def processor(device: torch.device | str | None = None) -> str:
    """The GPU's name for a CUDA ``device`` (``None``: CUDA when present), else the CPU's model name."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):  # not Linux, or a kernel that names no model
        import platform

        return platform.processor() or platform.machine()


def machine(device: torch.device | str | None = None) -> str:
    """Processor (or GPU), core count, torch version and thread count: where a number was measured."""
    return (f"{processor(device)}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s)")


@contextmanager
def precision(tf32: bool) -> Iterator[None]:
    """Allow TF32 matrix products and convolutions on CUDA inside the block only (``tf32``), and
    restore the process's settings after it, so that no other code runs at reduced precision."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
