"""Where a number came from: device, driver, library versions, dtype, attention backend, code revision."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch
import transformers


def git_revision() -> str:
    """The checkout's commit (with '+dirty' for uncommitted changes), or 'unknown' outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty.strip() else "")


def device_facts(device: torch.device | str) -> dict:
    device = torch.device(device)
    if device.type == "cuda":
        import pynvml

        try:
            pynvml.nvmlInit()
            driver = pynvml.nvmlSystemGetDriverVersion()
        except pynvml.NVMLError:
            driver = None
        return {
            "device": torch.cuda.get_device_name(device),
            "driver": driver,
            "cuda": torch.version.cuda,
            "tf32": tf32_use(),
        }
    cpu = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"device": cpu, "driver": None, "cuda": None, "tf32": None}


def tf32_use() -> str:
    """Where CUDA float32 work may round to TF32's 10-bit mantissa: 'matmul', 'cudnn', both or
    'off'. PyTorch's defaults allow it in cuDNN's convolutions (the vision towers' patch
    embeddings), so two float32 runs can differ in it, and a near-tie answer with it."""
    allowed = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
    return "+".join(name for name, on in allowed.items() if on) or "off"


def provenance(model: torch.nn.Module, device: torch.device | str) -> dict:
    """Every record carries this (docs/architecture.md#profiling)."""
    return {
        **device_facts(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": str(model.dtype).removeprefix("torch."),
        "attention": model.config._attn_implementation,
        "git_revision": git_revision(),
        "python": platform.python_version(),
    }
