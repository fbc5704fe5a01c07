"""quantized_kernels' Triton int8 kernel against a float64 matmul of the weights its codes stand for: on a GPU as it
runs there (bf16 activations), elsewhere through Triton's interpreter (fp16 activations: the interpreter converts
integers to bf16 wrongly). It needs Triton: torch's CUDA wheels bring it; CI installs it on the CPU for these tests."""

import pytest
import torch

from quantize import QuantizedLinear, dequantize

pytest.importorskip("triton")
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float16


@pytest.fixture(scope="module")
def kernels():
    import quantized_kernels

    if not ON_GPU and type(quantized_kernels.int8_matmul_kernel).__name__ != "InterpretedFunction":
        pytest.fail("without a GPU the kernel runs in Triton's interpreter: TRITON_INTERPRET=1 (conftest.py sets it)")
    return quantized_kernels


def quantized(mode: str, group_size, N: int, K: int) -> QuantizedLinear:
    torch.manual_seed(N + K)
    return QuantizedLinear.from_linear(torch.nn.Linear(K, N, bias=False), mode, group_size).to(DEVICE)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected).norm() / expected.norm()).item()


# (N, K): output channels not a multiple of the blocks (200), a K that splits unevenly (1,280 = 5 x 256)
SHAPES = [(200, 384), (64, 1280)]


@pytest.mark.parametrize("N, K", SHAPES)
@pytest.mark.parametrize("sms", [1, 64])  # 64 SMs split K for few rows
def test_the_int8_kernel_computes_the_matmul_of_the_dequantized_weights(kernels, N, K, sms):
    module = quantized("int8", None, N, K)
    weight = dequantize(module, torch.float64)
    configs = kernels.launch_configs(N, K, sms)
    for rows in (1, 5, 40):  # a decode, a verify, a prefill (more rows than a dot's 16)
        x = torch.randn(rows, K, device=DEVICE).to(DTYPE)
        got = kernels.int8_matmul(x, module.codes, module.scales, torch.float32, configs)
        assert got.dtype == torch.float32 and got.shape == (rows, N)
        assert relative_error(got, x.double() @ weight.T) < 1e-5


def test_a_decode_split_covers_the_input_once_and_busies_half_the_sms(kernels):
    block_k = kernels.INT8_BLOCK_K
    for N, K in [(4096, 4096), (4096, 11008), (2048, 2048), (200, 1280)]:
        few_rows, many_rows = kernels.launch_configs(N, K, 132)
        for config in (few_rows, many_rows):
            assert config.k_per_split % block_k == 0
            assert (config.splits - 1) * config.k_per_split < K <= config.splits * config.k_per_split  # none empty
        assert many_rows.splits == 1 and few_rows.k_per_split <= kernels.MAX_K_PER_SPLIT
        programs = -(-N // few_rows.block_n) * few_rows.splits
        # half the SMs busy, or splits so many that halving them again would leave a split under 2 iterations
        assert programs >= 132 // 2 or few_rows.k_per_split < 4 * block_k
    assert kernels.launch_configs(4096, 4096, 132)[0].splits == 1  # 128 blocks of 32 channels: unsplit
    assert kernels.launch_configs(4096, 11008, 132)[0].splits == 3  # stretches of at most 4,096
