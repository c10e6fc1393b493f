"""Energy: NVML's total-energy counter around the timed iterations, joules per sample.

Reported as unavailable (None, with the reason) on CPU or where the GPU has no energy counter
(pre-Volta), never as 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EnergyReport:
    joules_per_sample: float | None
    unavailable_reason: str | None = None


class EnergyMeter:
    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._handle = None
        self._start_mj: int | None = None
        self.reason: str | None = None
        if self.device.type != "cuda":
            self.reason = "no NVML energy counter on CPU"
            return
        import pynvml

        try:
            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(self.device.index or 0)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        except pynvml.NVMLError as error:
            self._handle, self.reason = None, f"NVML energy counter unavailable: {error}"

    def start(self) -> None:
        if self._handle is not None:
            import pynvml

            torch.cuda.synchronize(self.device)
            self._start_mj = pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)

    def stop(self, samples: int) -> EnergyReport:
        if self._handle is None or self._start_mj is None:
            return EnergyReport(None, self.reason)
        import pynvml

        torch.cuda.synchronize(self.device)
        millijoules = pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) - self._start_mj
        return EnergyReport(millijoules / 1000.0 / samples)
