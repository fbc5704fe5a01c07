"""The quantized linear layers' kernels alone on CUDA, at one decode step's shapes: microseconds per call and the rate
the weights are read at, for bf16 F.linear (cuBLAS), quantized_kernels' Triton int8 kernel and tinygemm's int4
(`_weight_int4pack_mm`), with 1 and 5 rows. --sweep also times other launch configurations of the Triton kernel at
one row: the data behind quantized_kernels.launch_configs' choice.

    python bench/quantized_kernels.py --model_name Llama-2-7b-hf --sweep --output out/bench/quantized_kernels.json

Each call reads weights that are not in the L2 cache: the calls cycle through copies of the layer totalling at least
4x the L2, captured in one CUDA graph (a Python launch alone, ~20 us, is longer than reading a 4096 x 4096 int8 layer).
"""

import itertools
import math
import sys
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import read_bandwidth, report_header  # noqa: E402
from checkpoint import named_config  # noqa: E402
from model import GPT  # noqa: E402
from quantize import GROUP_SIZES  # noqa: E402
from utils import UserError, cli, write_json  # noqa: E402

# a kernel under test: (the bytes of one copy of the layer it reads, a call on copy i for rows x)
Kernel = Tuple[int, Callable[[int, torch.Tensor], torch.Tensor]]


def main(model_name: str = "Llama-2-7b-hf", rows: Sequence[int] = (1, 5), group_size: int = 64, sweep: bool = False,
         output: Optional[Path] = None) -> dict:
    """Time each kernel on each distinct linear-layer shape of the model; print a table and return the figures.

    Args:
        model_name: a config of model.py (its linear layers' shapes)
        rows: rows of the activations (1: a decode step; k + 1: a speculative verify)
        group_size: the int4 group size
        sweep: also time the Triton kernel's other launch configurations at one row
        output: write the figures here as JSON
    """
    shapes = layer_shapes(model_name)
    if group_size not in GROUP_SIZES or any(K % group_size for _, K in shapes):
        raise UserError(f"--group_size {group_size}: expected one of {list(GROUP_SIZES)} dividing the input widths "
                        f"{sorted({K for _, K in shapes})}")
    if not rows or min(rows) < 1:
        raise UserError(f"--rows {list(rows)}: expected row counts of at least 1")
    if not torch.cuda.is_available():
        raise UserError("bench/quantized_kernels.py times CUDA kernels: torch sees no CUDA device")
    import quantized_kernels

    device = torch.device("cuda")
    properties = torch.cuda.get_device_properties(device)
    sms = properties.multi_processor_count
    bandwidth = read_bandwidth(device)
    report = {**report_header("bench/quantized_kernels.py", device),
              "arguments": dict(model_name=model_name, rows=list(rows), group_size=group_size, sweep=sweep),
              "read_bandwidth_gb_per_s": bandwidth / 1e9, "shapes": []}
    print(f"{report['device']}, {properties.multi_processor_count} SMs, L2 {properties.L2_cache_size >> 20} MB; "
          f"torch {torch.__version__}; read bandwidth {bandwidth / 1e9:.0f} GB/s")
    print(f"{'N x K':>13} {'layers':>6} {'rows':>4} {'kernel':>14} {'us':>8} {'GB/s':>7} {'of bound':>8}")
    for (N, K), layers in shapes.items():
        shape = dict(N=N, K=K, layers_per_model=layers, rows={})
        weights = layer_weights(N, K, group_size, properties.L2_cache_size)
        int8_configs = quantized_kernels.launch_configs(N, K, sms)
        for M in rows:
            x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
            shape["rows"][M] = {}
            for name, kernel in kernels(quantized_kernels, weights, group_size, int8_configs).items():
                seconds = seconds_per_call(kernel, x, properties.L2_cache_size)
                shape["rows"][M][name] = dict(microseconds=seconds * 1e6, gb_per_s=kernel[0] / seconds / 1e9,
                                              fraction_of_bound=kernel[0] / seconds / bandwidth)
                print(f"{f'{N} x {K}':>13} {layers:6d} {M:4d} {name:>14} {seconds * 1e6:8.1f} "
                      f"{kernel[0] / seconds / 1e9:7.0f} {kernel[0] / seconds / bandwidth:8.1%}")
        if sweep and layers > 1:  # not the head: its 32k outputs fill the SMs
            shape["sweep"] = sweep_configs(quantized_kernels, weights, N, K, group_size, properties, bandwidth)
        del weights
        report["shapes"].append(shape)
        if output is not None:
            write_json(output, report)
    if output is not None:
        print(f"Wrote {output}")
    return report


def layer_shapes(model_name: str) -> Dict[Tuple[int, int], int]:
    """(out_features, in_features) of the model's linear layers, with how many layers have each."""
    with torch.device("meta"):
        model = GPT(named_config(model_name))
    return dict(Counter((m.out_features, m.in_features) for m in model.modules() if isinstance(m, torch.nn.Linear)))


def layer_weights(N: int, K: int, group_size: int, l2_bytes: int) -> Dict[str, Tuple[int, list]]:
    """Random weights of an (N, K) layer in each format: (the bytes a call reads, copies filling 4x the L2)."""
    groups = K // group_size

    def copies(nbytes: int, make: Callable[[], tuple]) -> Tuple[int, list]:
        return nbytes, [make() for _ in range(copies_needed(nbytes, l2_bytes))]

    inner_k_tiles = next(tiles for tiles in (8, 4, 2) if K % (16 * tiles) == 0)
    return {
        "bf16": copies(2 * N * K, lambda: (torch.randn(N, K, device="cuda", dtype=torch.bfloat16),)),
        "int8": copies(N * K + 4 * N, lambda: (torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8),
                                               torch.rand(N, device="cuda"))),
        # codes two to a byte, a bf16 scale and zero per group and output channel
        "tinygemm": copies(N * K // 2 + 2 * 2 * groups * N, lambda: (
            torch.ops.aten._convert_weight_to_int4pack(
                torch.randint(0, 256, (N, K // 2), device="cuda", dtype=torch.uint8), inner_k_tiles),
            torch.rand(groups, N, 2, device="cuda", dtype=torch.bfloat16))),
    }


def kernels(quantized_kernels, weights: dict, group_size: int, int8_configs) -> Dict[str, Kernel]:
    """The kernels compared, on `weights` (layer_weights'); the Triton kernel with the given launch configs."""
    bf16, int8, tinygemm = (weights[name][1] for name in ("bf16", "int8", "tinygemm"))
    return {
        "bf16 F.linear": (weights["bf16"][0], lambda i, x: F.linear(x, bf16[i][0])),
        "int8 triton": (weights["int8"][0],
                        lambda i, x: quantized_kernels.int8_matmul(x, *int8[i], x.dtype, int8_configs)),
        "int4 tinygemm": (weights["tinygemm"][0],
                          lambda i, x: torch.ops.aten._weight_int4pack_mm(x, tinygemm[i][0], group_size,
                                                                          tinygemm[i][1])),
    }


def copies_needed(nbytes: int, l2_bytes: int) -> int:
    return min(64, max(2, math.ceil(4 * l2_bytes / nbytes)))


def seconds_per_call(kernel: Kernel, x: torch.Tensor, l2_bytes: int, repeats: int = 5) -> float:
    """The best of `repeats` replays of a CUDA graph of one call on each copy, per call."""
    n = copies_needed(kernel[0], l2_bytes)
    for i in range(n):  # compiles the Triton kernels, and checks each copy runs
        kernel[1](i, x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n):
            kernel[1](i, x)
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / n)
    return min(times)


def sweep_configs(quantized_kernels, weights: dict, N: int, K: int, group_size: int, properties,
                  bandwidth: float) -> dict:
    """One-row GB/s of the Triton int8 kernel under other block sizes, splits of K, warps and pipeline stages."""
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    default = quantized_kernels.launch_configs(N, K, properties.multi_processor_count)
    steps = math.ceil(K / default[0].block_k)
    # block sizes by splits of K, then the default's blocks with other warps and pipeline stages
    candidates = [default[0]] + [replace(default[0], num_warps=warps, num_stages=stages)
                                 for warps, stages in ((8, 3), (4, 2), (4, 4))]
    for block_n, splits in itertools.product((32, 64, 128), (1, 2, 4, 8)):
        if splits <= steps:
            k_per_split = math.ceil(steps / splits) * default[0].block_k
            candidates.append(replace(default[0], block_n=block_n, splits=math.ceil(K / k_per_split),
                                      k_per_split=k_per_split))
    rates = []
    for config in dict.fromkeys(candidates):
        kernel = kernels(quantized_kernels, weights, group_size, (config, default[1]))["int8 triton"]
        seconds = seconds_per_call(kernel, x, properties.L2_cache_size)
        rates.append(dict(config=asdict(config), gb_per_s=kernel[0] / seconds / 1e9))
    best = max(rates, key=lambda rate: rate["gb_per_s"])
    print(f"{f'{N} x {K}':>13} sweep int8: default {rates[0]['gb_per_s']:.0f} GB/s "
          f"({rates[0]['gb_per_s'] * 1e9 / bandwidth:.1%}), best {best['gb_per_s']:.0f} GB/s "
          f"({best['gb_per_s'] * 1e9 / bandwidth:.1%}) with {best['config']}")
    return dict(default=rates[0], best=best, all=rates)


if __name__ == "__main__":
    cli(main)
