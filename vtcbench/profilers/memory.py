"""Memory: the KV cache a prefill leaves, torch's peak allocator figures, NVML's per-process view.

On CPU torch keeps no allocator statistics and NVML does not apply: those fields are None
("unavailable"), never 0. A model split over GPUs (`--device-map`) is measured on each of them:
the totals sum them, and `per_device_max_allocated_bytes` lists each.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class MemoryReport:
    kv_cache_bytes: int
    #: summed over the GPUs the model sits on (one, unless `--device-map` split it)
    torch_max_allocated_bytes: int | None
    torch_max_reserved_bytes: int | None
    nvml_process_bytes: int | None
    #: per GPU ("cuda:0", ...): torch's peak allocated bytes; empty on CPU
    per_device_max_allocated_bytes: dict[str, int] = field(default_factory=dict)


def model_gpus(model: torch.nn.Module) -> list[torch.device]:
    """The GPUs a model's weights sit on: those of accelerate's `hf_device_map` for a dispatched
    model (its cpu and disk entries are not GPUs), else the model's device if it is one."""
    placed = getattr(model, "hf_device_map", None) or {"": model.device}
    devices = {torch.device("cuda", d) if isinstance(d, int) else torch.device(d) for d in placed.values() if d != "disk"}
    return sorted((d for d in devices if d.type == "cuda"), key=lambda d: d.index or 0)


class PeakMemory:
    """Reset torch's peak counters on each GPU of `devices`, then read the peaks and NVML's figure
    for this process (no GPU: every figure unavailable)."""

    def __init__(self, devices: list[torch.device]):
        self.devices = devices

    def reset(self) -> None:
        for device in self.devices:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)

    def read(self, kv_bytes: int) -> MemoryReport:
        if not self.devices:
            return MemoryReport(kv_bytes, None, None, None)
        for device in self.devices:
            torch.cuda.synchronize(device)
        allocated = {str(device): torch.cuda.max_memory_allocated(device) for device in self.devices}
        nvml = [_nvml_process_bytes(device) for device in self.devices]
        return MemoryReport(
            kv_cache_bytes=kv_bytes,
            torch_max_allocated_bytes=sum(allocated.values()),
            torch_max_reserved_bytes=sum(torch.cuda.max_memory_reserved(device) for device in self.devices),
            nvml_process_bytes=None if None in nvml else sum(nvml),
            per_device_max_allocated_bytes=allocated if len(allocated) > 1 else {},
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
