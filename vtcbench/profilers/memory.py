"""Memory: the KV cache a prefill leaves, torch's peak allocator figures, NVML's per-process view.

On CPU torch keeps no allocator statistics and NVML does not apply: those fields are None
("unavailable"), never 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MemoryReport:
    kv_cache_bytes: int
    torch_max_allocated_bytes: int | None
    torch_max_reserved_bytes: int | None
    nvml_process_bytes: int | None


class PeakMemory:
    """Reset torch's peak counters, then read peaks and NVML's figure for this process."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def read(self, kv_bytes: int) -> MemoryReport:
        if not self.cuda:
            return MemoryReport(kv_bytes, None, None, None)
        torch.cuda.synchronize(self.device)
        return MemoryReport(
            kv_cache_bytes=kv_bytes,
            torch_max_allocated_bytes=torch.cuda.max_memory_allocated(self.device),
            torch_max_reserved_bytes=torch.cuda.max_memory_reserved(self.device),
            nvml_process_bytes=_nvml_process_bytes(self.device),
        )


def _nvml_process_bytes(device: torch.device) -> int | None:
    """GPU memory NVML attributes to this process (None where NVML or the query is unavailable)."""
    import pynvml

    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if process.pid == os.getpid():
                return process.usedGpuMemory
        return None
    except pynvml.NVMLError:
        return None
