"""Helpers shared by the engine tests (imported by test modules; not a test file)."""

from __future__ import annotations

import ctypes

import torch


class TorchMemory:
    """Device memory for the engine taken from torch, as offload() does: page-aligned CPU
    buffers, and the map from the addresses the engine returns back to tensors."""

    def __init__(self) -> None:
        self.buffers: dict[int, torch.Tensor] = {}
        self.released: list[int] = []
        # Set from engine.stats()["in_place"]: a CPU engine reading in place returns
        # addresses in its block windows, not in provided memory.
        self.in_place = False

    def allocate(self, nbytes: int) -> int:
        # 4096-aligned: over-allocate and slice (the engine reads with O_DIRECT into it).
        raw = torch.empty(nbytes + 4096, dtype=torch.uint8)
        offset = (-raw.data_ptr()) % 4096
        tensor = raw[offset : offset + nbytes]
        self.buffers[tensor.data_ptr()] = tensor
        return tensor.data_ptr()

    def release(self, address: int, nbytes: int) -> None:
        assert self.buffers[address].numel() == nbytes
        del self.buffers[address]
        self.released.append(address)

    def view(self, address: int, size: int) -> torch.Tensor:
        for base, tensor in self.buffers.items():
            if base <= address and address + size <= base + tensor.numel():
                return tensor[address - base : address - base + size]
        if self.in_place:
            window = (ctypes.c_uint8 * size).from_address(address)
            return torch.frombuffer(window, dtype=torch.uint8)
        raise AssertionError(f"address {address:#x} is not in provided memory")

    def attach(self, engine) -> None:
        """Follows `engine`'s read path (call once the engine is open)."""
        self.in_place = bool(engine.stats()["in_place"])
