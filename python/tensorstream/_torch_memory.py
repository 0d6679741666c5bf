"""Memory from torch for the engine, and the small tensors that stand in for streamed weights.

* :class:`TorchMemory` gives the engine buffers allocated by torch on the runtime's device
  (so torch's allocator and ``max_memory_allocated`` see them) and turns the addresses the
  engine returns back into tensors;
* :func:`placeholder` is what a streamed parameter holds while its block is not acquired: a
  zero of its dtype shared by every parameter of that dtype on that device, expanded to the
  parameter's shape (stride 0), and :func:`placeholder_bytes` what those shared zeros take
  on the device (the runtime counts them in its budget);
* :func:`advise_huge_pages` and :func:`trim_host_heap` are advice to the OS about host memory.
"""

from __future__ import annotations

import bisect
import ctypes
import sys
import threading
from collections.abc import Iterable

import torch

__all__ = ["TorchMemory", "advise_huge_pages", "placeholder", "placeholder_bytes", "trim_host_heap"]

_MADV_HUGEPAGE = 14  # Linux

# torch's CUDA caching allocator rounds every allocation up to its minimum block size
# (kMinBlockSize, c10/cuda/CUDACachingAllocator.cpp): a one-element tensor holds 512 bytes.
_CUDA_MIN_BLOCK = 512

# The zeros placeholders expand, one per (dtype, device), made on first use and kept for the
# process: a post-hook then allocates nothing and launches no kernel. Nothing writes to them
# (a placeholder of more than one element refuses in-place writes, and a streamed parameter
# is only used inside its block's forward, as a view into the block); _SHARED_LOCK guards
# their creation.
_SHARED: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
_SHARED_LOCK = threading.Lock()


def advise_huge_pages(address: int, nbytes: int) -> None:
    """Asks for transparent huge pages: O_DIRECT reads into physically contiguous memory
    reach the disk's full speed (docs/benchmarks.md). Advice only; failures are ignored."""
    if nbytes < (2 << 20) or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(nbytes), _MADV_HUGEPAGE)
    except (OSError, AttributeError):
        pass


def trim_host_heap() -> None:
    """Returns the freed host copies to the OS now (glibc keeps freed heap memory otherwise)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _placeholder_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _shared_zero(dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    key = (dtype, _placeholder_device(device))
    zero = _SHARED.get(key)
    if zero is None:
        with _SHARED_LOCK:
            zero = _SHARED.get(key)
            if zero is None:
                # An ordinary tensor even when first needed inside inference_mode: it is
                # shared by forwards run in and out of it.
                with torch.inference_mode(False), torch.no_grad():
                    zero = torch.zeros((), dtype=dtype, device=key[1])
                _SHARED[key] = zero
    return zero


def placeholder(
    dtype: torch.dtype, shape: torch.Size | tuple[int, ...], device: torch.device | str
) -> torch.Tensor:
    """A tensor of ``dtype`` and ``shape`` on ``device`` backed by one element (stride 0):
    a view of the zero shared by every placeholder of that dtype and device, so making one
    allocates no device memory and launches nothing. Thread-safe."""
    return _shared_zero(dtype, device).expand(shape)


def placeholder_bytes(dtypes: Iterable[torch.dtype], device: torch.device | str) -> int:
    """Device bytes the shared placeholders of ``dtypes`` take on ``device`` (made or not),
    as its allocator counts them: one element per dtype, rounded up to 512 bytes on CUDA."""
    device = torch.device(device)
    total = 0
    for dtype in set(dtypes):
        nbytes = getattr(dtype, "itemsize", None) or torch.empty((), dtype=dtype).element_size()
        if device.type == "cuda":
            nbytes = -(-nbytes // _CUDA_MIN_BLOCK) * _CUDA_MIN_BLOCK
        total += nbytes
    return total


class TorchMemory:
    """Gives the engine memory allocated by torch on the target device and maps the addresses
    the engine returns back to tensors.

    Thread-safe: the engine allocates and releases from its own threads while hooks call
    :meth:`view`; ``_lock`` guards ``_buffers`` and ``_windows``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: dict[int, torch.Tensor] = {}
        # A CPU engine reading in place returns addresses inside its block windows (the
        # store's pages, mapped): tensors over them, made once per window.
        self.in_place = False
        self._windows: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()

    def allocate(self, nbytes: int) -> int:
        if self.device.type == "cpu":
            # The engine reads with O_DIRECT into this memory: align it to a page.
            raw = torch.empty(nbytes + 4096, dtype=torch.uint8)
            start = (-raw.data_ptr()) % 4096
            tensor = raw[start : start + nbytes]
            advise_huge_pages(tensor.data_ptr(), nbytes)
            tensor.zero_()  # fault the pages in now, not during the first fill
        else:
            tensor = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        with self._lock:
            self._buffers[tensor.data_ptr()] = tensor
        return tensor.data_ptr()

    def release(self, address: int, nbytes: int) -> None:
        with self._lock:
            self._buffers.pop(address, None)

    def view(self, address: int, size: int) -> torch.Tensor:
        """``size`` bytes at ``address``: inside a buffer this memory gave the engine (a unit's
        place in the arena is an offset into it), or, reading in place, of a window."""
        with self._lock:
            tensor = self._buffers.get(address)
            if tensor is None and self._buffers:
                bases = sorted(self._buffers)
                i = bisect.bisect_right(bases, address) - 1
                if i >= 0:
                    base = self._buffers[bases[i]]
                    offset = address - bases[i]
                    if offset + size <= base.numel():
                        tensor = base[offset:]
            if tensor is None and self.in_place:
                tensor = self._windows.get(address)
                if tensor is None or tensor.numel() < size:
                    window = (ctypes.c_uint8 * size).from_address(address)
                    tensor = torch.frombuffer(window, dtype=torch.uint8)
                    self._windows[address] = tensor
        if tensor is None or tensor.numel() < size:
            raise RuntimeError(f"tensorstream: engine returned unknown memory {address:#x}")
        return tensor[:size]

    def forget_windows(self) -> None:
        """Drops the tensors over block windows (call when the engine closes them)."""
        with self._lock:
            self._windows.clear()
