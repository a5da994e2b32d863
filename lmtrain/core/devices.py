"""Peak FLOP/s and memory of the devices lmtrain trains on: what MFU (model FLOPs utilisation) divides by.

The GPU figures are the vendors' dense (no sparsity) tensor-core peaks of the data sheets; fp32 is the plain
(non-TF32) peak, since lmtrain leaves TF32 off. A CPU's peak is measured in each process with short matmuls
(the fastest of them), per thread count; it is not cached across runs, whose load and threads differ.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("lmtrain")


@dataclass(frozen=True)
class Device:
    name: str
    peak_flops: dict[str, float]  # precision (fp32 | bf16 | fp16) -> FLOP/s
    memory_bytes: int  # what training may use


GB = 1e9
T = 1e12
# key (matched against torch.cuda.get_device_name(), lower case, longest key first) -> dense peaks and memory
GPUS: dict[str, Device] = {
    "h200": Device("NVIDIA H200", {"bf16": 989 * T, "fp16": 989 * T, "fp32": 67 * T}, int(141 * GB)),
    "h100": Device("NVIDIA H100 SXM", {"bf16": 989 * T, "fp16": 989 * T, "fp32": 67 * T}, int(80 * GB)),
    "h100 pcie": Device("NVIDIA H100 PCIe", {"bf16": 756 * T, "fp16": 756 * T, "fp32": 51 * T}, int(80 * GB)),
    "a100": Device("NVIDIA A100 80GB", {"bf16": 312 * T, "fp16": 312 * T, "fp32": 19.5 * T}, int(80 * GB)),
    "a100-40gb": Device("NVIDIA A100 40GB", {"bf16": 312 * T, "fp16": 312 * T, "fp32": 19.5 * T}, int(40 * GB)),
    "l40s": Device("NVIDIA L40S", {"bf16": 362 * T, "fp16": 362 * T, "fp32": 91.6 * T}, int(48 * GB)),
    "l4": Device("NVIDIA L4", {"bf16": 121 * T, "fp16": 121 * T, "fp32": 30.3 * T}, int(24 * GB)),
    "a10": Device("NVIDIA A10", {"bf16": 125 * T, "fp16": 125 * T, "fp32": 31.2 * T}, int(24 * GB)),
    "4090": Device("NVIDIA GeForce RTX 4090", {"bf16": 165 * T, "fp16": 165 * T, "fp32": 82.6 * T}, int(24 * GB)),
    "3090": Device("NVIDIA GeForce RTX 3090", {"bf16": 71 * T, "fp16": 71 * T, "fp32": 35.6 * T}, int(24 * GB)),
    "v100": Device("NVIDIA V100", {"fp16": 125 * T, "fp32": 15.7 * T}, int(32 * GB)),
    "t4": Device("NVIDIA T4", {"fp16": 65 * T, "fp32": 8.1 * T}, int(16 * GB)),
    "mi300x": Device("AMD Instinct MI300X", {"bf16": 1307 * T, "fp16": 1307 * T, "fp32": 163.4 * T}, int(192 * GB)),
    "mi250x": Device("AMD Instinct MI250X", {"bf16": 383 * T, "fp16": 383 * T, "fp32": 47.9 * T}, int(128 * GB)),
}
# What a well-tuned run reaches of the peak, for time estimates before measuring: ~40% is typical of GPU
# training at this scale (PaLM reports 46%, nanoGPT ~40% on A100); on a CPU, where the peak is measured in the
# same process, runs of real models measured 0.66-0.80 of it (a LoRA chat finetune of SmolLM2-135M: 0.70).
ASSUMED_MFU = {"cuda": 0.4, "cpu": 0.65}


def lookup(name: str) -> Device | None:
    """The table's entry for a device name ('h100', 'NVIDIA A100-SXM4-80GB', ...), or None."""
    name = name.lower().replace("_", " ")
    if name in GPUS:
        return GPUS[name]
    if "a100" in name and "40gb" in name.replace(" ", "").replace("-", ""):
        return GPUS["a100-40gb"]
    if "h100" in name and "pcie" in name:
        return GPUS["h100 pcie"]
    for key in sorted(GPUS, key=len, reverse=True):
        if key in name:
            return GPUS[key]
    return None


def cuda_device(index: int = 0) -> Device | None:
    """This machine's GPU from the table, with its real memory; None when the table does not know it."""
    import torch

    props = torch.cuda.get_device_properties(index)
    known = lookup(props.name)
    return Device(props.name, known.peak_flops, props.total_memory) if known else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_cpu_peak(precision: str = "fp32", size: int = 1024, seconds: float = 0.3) -> float:
    """FLOP/s of a square matmul (2·n³ FLOPs each) in `precision` on this CPU: the fastest of the matmuls
    timed one by one over ~`seconds`, so another process's load during a few of them does not lower it.
    n grows from 256 to `size` while the next size's matmul would take under a third of `seconds`, so a
    precision the CPU emulates (fp16 on most) is measured in well under a second too."""
    import torch

    from lmtrain.core.dtypes import DTYPES

    dtype = DTYPES[precision]
    n = 256
    while True:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        before = time.perf_counter()
        a @ b  # warm-up: thread pool and kernels
        if n >= size or 8 * (time.perf_counter() - before) > seconds / 3:
            break
        n *= 2
    fastest, count, start = float("inf"), 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count < 3:
        before = time.perf_counter()
        a @ b
        fastest = min(fastest, time.perf_counter() - before)
        count += 1
    return 2 * n**3 / fastest


_CPU_PEAKS: dict[tuple[str, int], float] = {}  # (precision, threads) -> FLOP/s, measured in this process


def cpu_peak(precision: str = "fp32", remeasure: bool = False) -> float:
    """This CPU's matmul FLOP/s in `precision` with this process's thread count: measured in this process
    (a value cached across runs would carry another moment's load and thread count), once unless `remeasure`;
    a new measurement only ever raises it."""
    import torch

    key = (precision, torch.get_num_threads())
    if remeasure or key not in _CPU_PEAKS:
        _CPU_PEAKS[key] = max(_CPU_PEAKS.get(key, 0.0), measure_cpu_peak(precision))
    return _CPU_PEAKS[key]


def cpu_has_native_bf16() -> bool:
    """Whether torch multiplies bfloat16 matrices in hardware on this CPU: it has AVX512-BF16 or AMX-BF16 and
    torch runs its AVX-512 kernels (ATEN_CPU_CAPABILITY may lower them). Otherwise bf16 matmuls are emulated,
    many times slower than float32 ones."""
    import torch

    capabilities = torch.cpu.get_capabilities()
    hardware = bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))
    return hardware and torch.backends.cpu.get_cpu_capability() == "AVX512"


def cpu_memory_bytes() -> int:
    """Memory available to a new process now (MemAvailable), else the physical total."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cpu_device(precision: str = "fp32") -> Device:
    peaks = {precision: cpu_peak(precision)}
    return Device(f"CPU ({_cpu_name()}, {_threads()} threads)", peaks, cpu_memory_bytes())


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def mfu(flops_per_s: float, peak: float, device, precision: str) -> float | None:
    """`flops_per_s` (one process's achieved model FLOP/s) as a fraction of its device's `peak`. A CPU's peak
    is measured: a rate above it measures it again, and a rate still above the new peak (the measurement was
    disturbed) gives None and a warning, never a utilisation above 1."""
    if device.type == "cpu" and flops_per_s > peak:
        peak = max(peak, cpu_peak(precision))
        if flops_per_s > peak:
            peak = cpu_peak(precision, remeasure=True)
        if flops_per_s > peak:
            log.warning("mfu: %.3g FLOP/s exceeds the measured CPU peak %.3g; not reported", flops_per_s, peak)
            return None
    return flops_per_s / peak


def peak_flops(device, precision: str) -> float | None:
    """Peak FLOP/s of one torch `device` in `precision`, what MFU divides by: the table's for a GPU it knows,
    measured once for the CPU; None when unknown (MFU is then not reported)."""
    if device.type == "cuda":
        found = cuda_device(device.index or 0)
        return found.peak_flops.get(precision) if found else None
    return cpu_peak(precision) if device.type == "cpu" else None
