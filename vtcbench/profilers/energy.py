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
    """NVML's energy counters of `devices` (the GPUs the model sits on; several when `--device-map`
    split it), summed; unavailable without a GPU or where one has no counter."""

    def __init__(self, devices: list[torch.device]):
        self.devices = devices
        self._handles: list = []
        self._start_mj: list[int] | None = None
        self.reason: str | None = None
        if not devices:
            self.reason = "no NVML energy counter on CPU"
            return
        import pynvml

        try:
            pynvml.nvmlInit()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(device.index or 0) for device in devices]
            for handle in self._handles:
                pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        except pynvml.NVMLError as error:
            self._handles, self.reason = [], f"NVML energy counter unavailable: {error}"

    def _read(self) -> list[int]:
        import pynvml

        for device in self.devices:
            torch.cuda.synchronize(device)
        return [pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) for handle in self._handles]

    def start(self) -> None:
        if self._handles:
            self._start_mj = self._read()

    def stop(self, samples: int) -> EnergyReport:
        if not self._handles or self._start_mj is None:
            return EnergyReport(None, self.reason)
        millijoules = sum(end - start for end, start in zip(self._read(), self._start_mj))
        return EnergyReport(millijoules / 1000.0 / samples)
