"""bench/quantized_decode.py: the commands of its docstring run end to end on a tiny stand-in config and report every
mode with its kernels, the bytes it reads and the verify costs."""

import json
import shlex

import pytest
import torch

import native_kernels
from bench import quantized_decode
from utils import UserError, cli

# the docstring's commands in seconds: model.py's demo config (its MLP width 704 takes int4 groups of 32 and 64, not
# 128: that mode is skipped, and says why), a few tokens
STAND_IN = {"--model_name": "demo", "--max_new_tokens": "8", "--repeats": "1", "--prompt_length": "4"}


def documented_commands() -> list:
    commands = []
    for line in quantized_decode.__doc__.replace("\\\n", "").splitlines():
        if line.strip().startswith("python bench/quantized_decode.py "):
            words = shlex.split(line)[2:]
            commands.append({flag: value for flag, value in zip(words[::2], words[1::2]) if flag != "--output"})
    return commands


def test_documented_commands_report_every_mode(tmp_path, capsys):
    commands = documented_commands()
    assert [flags["--model_name"] for flags in commands] == ["AMD-Llama-135m", "tiny_LLaMA_1b"]
    output = tmp_path / "figures.json"
    argv = [word for pair in {**commands[0], **STAND_IN, "--max_k": "2", "--output": str(output)}.items()
            for word in pair]
    report = json.loads(json.dumps(cli(quantized_decode.main, argv)))
    assert json.loads(output.read_text()) == report
    results = report["results"]
    assert list(results) == list(quantized_decode.MODES)
    assert "does not divide the input widths [704]" in results.pop("int4_g128")["skipped"]
    assert results.pop("int8_no_triton")["skipped"].startswith("CUDA only")  # the torch-only CUDA int8, beside Triton
    fp32, int8, int4 = (results[mode]["weight_bytes_per_token"] for mode in ("fp32", "int8", "int4_g64"))
    assert int4 < int8 < fp32 / 3  # codes and scales instead of float32 weights
    for figures in results.values():
        assert figures["tokens_per_s"] > 0 and len(figures["verify_steps"]) == 2
        # each timed run paired with a bandwidth reading taken right after it
        runs, readings = figures["seconds"], figures["read_bandwidth_gb_per_s"]
        assert len(runs) == len(readings) == len(figures["fractions_of_bandwidth_bound"]) == 1 and readings[0] > 0
        assert figures["fraction_of_bandwidth_bound"] == figures["fractions_of_bandwidth_bound"][0] > 0
    # float32 activations: the native kernel where it builds, else the dequantized fallback; int8_no_native: aten's
    native = native_kernels.load()[0] is not None
    assert ("cpu_int8_native" if native else "dequantized") in results["int8_fp32"]["kernels"]
    assert "native" not in results["int8_no_native"]["kernels"]
    assert "tokens/s" in capsys.readouterr().out


def test_the_kernel_bench_needs_a_gpu_and_says_so():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: bench/gpu_suite.py runs this bench")
    from bench import quantized_kernels

    with pytest.raises(UserError, match="no CUDA device"):
        quantized_kernels.main()
