"""Helpers shared by the engine tests (imported by test modules; not a test file)."""

from __future__ import annotations

import torch


class TorchMemory:
    """Device memory for the engine taken from torch, as offload() does: page-aligned CPU
    buffers, and the map from the addresses the engine returns back to tensors."""

    def __init__(self) -> None:
        self.buffers: dict[int, torch.Tensor] = {}
        self.released: list[int] = []

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
        raise AssertionError(f"address {address:#x} is not in provided memory")
