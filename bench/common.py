"""What the benchmarks share: the machine and versions a report records, its common header, the names of the
attention kernels a profile shows, the copy bandwidth and decode timing. Imports no torch at load, so
bench/prepare_throughput.py stays torch-free."""

import datetime
import importlib.metadata
import platform
import re
import shlex
import sys
import time
from pathlib import Path

# (a profiler event's name contains, the SDPA backend or kernel it is)
ATTENTION_OPS = (
    ("_scaled_dot_product_cudnn_attention", "CUDNN_ATTENTION"),
    ("_scaled_dot_product_flash_attention_for_cpu", "FLASH_ATTENTION (CPU)"),
    ("_scaled_dot_product_flash_attention", "FLASH_ATTENTION"),
    ("_scaled_dot_product_efficient_attention", "EFFICIENT_ATTENTION"),
    ("_scaled_dot_product_attention_math", "MATH"),
    ("flash_attn::", "flash-attn (the package)"),
)


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M) if cpuinfo.exists() else None
    return match[1].strip() if match else platform.processor() or platform.machine()


def versions() -> dict:
    import torch

    found = {}
    for package in ("torch", "transformers", "lightning-fabric"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:  # transformers, with --models ours
            found[package] = None
    return {**found, "torch_cuda": torch.version.cuda, "python": platform.python_version()}


def report_header(script: str, device) -> dict:
    """What every decoding benchmark's JSON starts with: the script, date, command line, device and versions."""
    import torch

    return {
        "benchmark": script,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.argv]) if sys.argv[0].endswith(Path(script).name) else None,
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"{cpu_model()}, {torch.get_num_threads()} torch threads"),
        "versions": versions(),
    }


def copy_bandwidth(device) -> float:
    """Bytes read plus written per second by a device-to-device copy of a buffer larger than the caches."""
    import torch

    size = (1 << 30) if device.type == "cuda" else (256 << 20)
    source = torch.empty(size, dtype=torch.uint8, device=device)
    destination = torch.empty_like(source)
    return 2 * size / best_seconds(lambda: destination.copy_(source), device)


def read_bandwidth(device) -> float:
    """Bytes read per second by a reduction over a buffer larger than the caches: the rate a decode step's reading of
    its weights can reach at most."""
    import torch

    size = (1 << 30) if device.type == "cuda" else (256 << 20)
    source = torch.ones(size // 4, dtype=torch.float32, device=device)
    return size / best_seconds(source.sum, device)


def best_seconds(operation, device, repeats: int = 5) -> float:
    """The shortest of `repeats` timed calls of `operation`, after an untimed first one (first touch)."""
    from generation import synchronize

    operation()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        operation()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def time_decoding(decode, prompt, device, repeats: int, after_each=None):
    """Seconds of each of `repeats` runs after an untimed warm-up, and the token ids of the last run. after_each, if
    given, is called untimed after each timed run (a reading paired with that run)."""
    import torch

    from generation import synchronize

    with torch.inference_mode():
        decode(prompt)
        seconds = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            ids = decode(prompt)
            synchronize(device)
            seconds.append(time.perf_counter() - start)
            if after_each is not None:
                after_each()
    return seconds, ids.tolist()
