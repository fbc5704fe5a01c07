"""A Triton kernel for quantize.py's int8 weight-only linear layers on CUDA: y = x @ W.T with W = code * scale, the
codes (N, K) int8 and one float32 scale per output channel, read as stored (no repacking, no dequantized copy).

Why: at batch 1 a decode step reads every weight once, so its speed is the rate the codes stream from memory. In our
Llama-2-7B-shaped decode on an H200, inductor's fused int8 product-and-sum read them at 27% of the bandwidth (the
int8 model decoded at 0.78x bf16); this kernel reads the 7B layers at 55-69% (1.33x bf16, bench/RESULTS.md).

How: a grid of (blocks of rows, blocks of output channels, splits of the input dimension). Each program multiplies
its activations (rows padded to 16, the least tl.dot takes) by tiles of codes converted to the activation dtype
(exact: integers below 256) with tl.dot, accumulating in float32, and multiplies the sum by the scales at the end. A
decode has few output blocks for the number of SMs on a narrow layer, and a long input dimension is read faster in
stretches: the input dimension is then split, each split writing float32 partial sums that are added after (in a
fixed order: the same inputs give the same bits).

int4 stays with tinygemm (`_weight_int4pack_mm`): four Triton int4 kernels read the 7B layers at 14-24% (a dot per
group, the scale applied to its product, the weights either operand), 3-4% (dequantized in registers, the scales
gathered per weight) and 17-28% (one row summed in float32 registers, the codes made floats by bit operations) of the
bandwidth, against tinygemm's 34-50% (bench/RESULTS.md).
"""

from dataclasses import dataclass
from typing import Tuple

import torch
import triton
import triton.language as tl

ROWS_PER_DOT = 16  # tl.dot's least block of rows: a decode's single row is padded to it
# a decode's launch (bench/quantized_kernels.py --sweep on an H200, GB/s read at one row): blocks of 32 output
# channels unsplit read a 4096 x 4096 layer at 1,540, 64 split in 4 at 1,491, 128 unsplit at 821; 4 pipeline stages
# 1,773 where 3 read 1,540 (the 7B's other layers: within 1%); a 4096 x 11008 layer reads 2,247-2,261 with K in 3-4
DECODE_BLOCK_N = 32
DECODE_STAGES = 4
MAX_K_PER_SPLIT = 4096
INT8_BLOCK_K = 256  # inputs per iteration of the int8 kernel's loop


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int  # rows per program
    block_n: int  # output channels per program
    block_k: int  # inputs per iteration of a program's loop
    splits: int  # programs along the input dimension
    k_per_split: int  # inputs each split covers, a multiple of block_k
    num_warps: int
    num_stages: int


def launch_configs(N: int, K: int, sms: int) -> Tuple[LaunchConfig, LaunchConfig]:
    """The launch configurations of an (M, K) x (K, N) product on a GPU of `sms` SMs: for M <= 16 (decode and
    verify steps: narrow blocks of output channels, K split into stretches of at most MAX_K_PER_SPLIT, and further
    while fewer programs than half the SMs would run) and for more rows (a prefill: larger blocks, no split).
    Computed once per layer, at load: a compiled step then reads them as constants."""
    block_k = INT8_BLOCK_K
    steps = triton.cdiv(K, block_k)
    splits = triton.cdiv(K, MAX_K_PER_SPLIT)
    while triton.cdiv(N, DECODE_BLOCK_N) * splits < sms // 2 and steps >= 4 * splits:
        splits *= 2  # each split keeps two or more iterations
    k_per_split = triton.cdiv(steps, splits) * block_k
    few_rows = LaunchConfig(ROWS_PER_DOT, DECODE_BLOCK_N, block_k, triton.cdiv(K, k_per_split), k_per_split,
                            num_warps=4, num_stages=DECODE_STAGES)
    many_rows = LaunchConfig(64, 128, block_k, 1, steps * block_k, num_warps=4, num_stages=2)
    return few_rows, many_rows


@triton.jit
def int8_matmul_kernel(x_ptr, codes_ptr, scales_ptr, out_ptr, M, N, K,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STEPS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = split * STEPS * BLOCK_K
    for step in range(STEPS):
        ks = k_start + step * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        codes = tl.load(codes_ptr + cols[None, :] * K + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0)
        acc = tl.dot(x, codes.to(x.dtype), acc)
    acc *= tl.load(scales_ptr + cols, mask=col_ok, other=0.0)[None, :]
    tl.store(out_ptr + (split * M + rows[:, None]) * N + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])


def int8_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype,
                configs: Tuple[LaunchConfig, LaunchConfig]) -> torch.Tensor:
    """x (M, K) bf16 or fp16, codes (N, K) int8, scales (N,) float32 -> (M, N) in out_dtype; `configs`:
    launch_configs(N, K, the GPU's SMs)."""
    M, K = x.shape
    N = codes.size(0)
    config = configs[1] if M > ROWS_PER_DOT else configs[0]
    out = partial_sums(config, M, N, x.device, out_dtype)
    int8_matmul_kernel[grid(config, M, N)](x, codes, scales, out, M, N, K,
                                           BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                                           STEPS=config.k_per_split // config.block_k,
                                           num_warps=config.num_warps, num_stages=config.num_stages)
    return add_splits(out, out_dtype)


def grid(config: LaunchConfig, M: int, N: int) -> tuple:
    return triton.cdiv(M, config.block_m), triton.cdiv(N, config.block_n), config.splits


def partial_sums(config: LaunchConfig, M: int, N: int, device: torch.device, out_dtype: torch.dtype) -> torch.Tensor:
    """The kernel's output: (splits, M, N), float32 when the splits are added after."""
    return torch.empty(config.splits, M, N, device=device, dtype=torch.float32 if config.splits > 1 else out_dtype)


def add_splits(out: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    return out[0] if out.size(0) == 1 else out.sum(0).to(out_dtype)
