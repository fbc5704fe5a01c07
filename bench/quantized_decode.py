"""Batch-1 greedy decoding with quantized weights (quantize.py) against float weights, side by side in one run on the
same random weights: decode tokens/s (the prefill timed apart and taken out), bytes of weights read per token, the
fraction of the memory-bandwidth bound (the rate a reduction reads memory at, read right after each timed run and
paired with it: a decode step streams its weights once; the median of the runs' fractions and their range), and the
cost of a speculative verify of k + 1 tokens relative to one decode step.

On the CPU (2 cores; run it alone: a second torch process slows both several times):

    python bench/quantized_decode.py --model_name AMD-Llama-135m --max_new_tokens 64 \\
        --output out/bench/quantized_cpu_135m.json
    python bench/quantized_decode.py --model_name tiny_LLaMA_1b --max_new_tokens 16 --repeats 2 \\
        --output out/bench/quantized_cpu_tinyllama.json

Modes: fp32 and bf16 (float weights, F.linear), int8 and int4 with groups of 32, 64 and 128 (the packed kernels with
bf16 activations where the CPU has bf16 instructions), and int8_fp32: int8 with float32 activations (what a CPU
without bf16 instructions runs: the native kernel, or without it the dequantized fallback); on CUDA, int8_no_triton:
the torch-only int8 path a CUDA machine without Triton runs (inductor's fused product-and-sum), beside
quantized_kernels' Triton kernel; on the CPU, int8_no_native: int8 without native_kernels' C kernel (aten's kernel
eagerly; compiled, the same loop as int8), what a CPU without AVX-512 or a C compiler runs. --compile adds each
mode's compiled decode step.
"""

import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import copy_bandwidth, read_bandwidth, report_header, time_decoding  # noqa: E402
from checkpoint import named_config  # noqa: E402
from generation import compiled_step, generate, synchronize  # noqa: E402
from model import GPT  # noqa: E402
from quantize import Quantization, describe, quantize_for_inference, weight_bytes  # noqa: E402
from speculative import verify_logits  # noqa: E402
from utils import UserError, cli, write_json  # noqa: E402

MODES = ("fp32", "bf16", "int8", "int4_g32", "int4_g64", "int4_g128", "int8_fp32", "int8_no_triton", "int8_no_native")


def main(model_name: str = "AMD-Llama-135m", max_new_tokens: int = 64, prompt_length: int = 16, repeats: int = 3,
         modes: Sequence[str] = MODES, compile: bool = False, max_k: int = 8, output: Optional[Path] = None,
         seed: int = 1337, device: Literal["auto", "cpu", "cuda"] = "auto") -> dict:
    """Time batch-1 greedy decoding of each mode; print a table and return (and write) the figures.

    Args:
        model_name: a config of model.py
        max_new_tokens: tokens generated per run: the first after the prefill, then max_new_tokens - 1 decode steps
        prompt_length: tokens of the (random) prompt
        repeats: timed runs per mode, after one untimed warm-up
        modes: some of fp32, bf16, int8, int4_g32, int4_g64, int4_g128, int8_fp32, int8_no_triton (CUDA),
            int8_no_native (CPU)
        compile: also time each mode's compiled decode step
        max_k: verify costs are measured for k + 1 tokens, k = 1..max_k (0: none, sparing a compile per length)
        output: write the figures here as JSON
        seed: seed of the weights and the prompt
        device: auto (CUDA if there is one), cpu or cuda
    """
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        raise UserError(f"--modes {list(modes)}: expected some of {list(MODES)}")
    if min(repeats, prompt_length) < 1 or max_k < 0 or max_new_tokens < 2:
        raise UserError("--repeats and --prompt_length must be at least 1, --max_k at least 0, --max_new_tokens at "
                        "least 2")
    config = named_config(model_name)
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA device; use --device cpu")
    device = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    torch.manual_seed(seed)
    with device:
        base = GPT(config).eval()
    prompt = torch.randint(0, config.vocab_size, (prompt_length,), device=device)
    bandwidth, copy = read_bandwidth(device), copy_bandwidth(device)
    report = {**report_header("bench/quantized_decode.py", device),
              "arguments": dict(model_name=model_name, max_new_tokens=max_new_tokens, prompt_length=prompt_length,
                                repeats=repeats, modes=list(modes), compile=compile, max_k=max_k, seed=seed),
              "read_bandwidth_gb_per_s": bandwidth / 1e9, "copy_bandwidth_gb_per_s": copy / 1e9, "results": {}}
    print(f"{report['device']}; torch {torch.__version__}. {model_name}, read bandwidth {bandwidth / 1e9:.1f} GB/s "
          f"(a copy: {copy / 1e9:.1f} GB/s read plus written)")
    print(f"{'mode':>16} {'MB/token':>9} {'tokens/s':>9} {'prefill':>8} {'vs fp32':>8} {'of bound':>9} {'(GB/s)':>7} "
          f"{'range':>8}  "
          + (f"verify k+1 = 2..{max_k + 1} (decode steps); " if max_k else "") + "prefill in ms")
    max_seq_length = prompt_length + max_new_tokens + max_k + 1
    for mode in [m for m in MODES if m in modes]:
        if mode.endswith("_no_triton") and device.type != "cuda":
            report["results"][mode] = dict(skipped="CUDA only (no Triton kernels run on the CPU)")
            print(f"{mode:>16} skipped: CUDA only")
            continue
        if mode == "int8_no_native" and device.type != "cpu":
            report["results"][mode] = dict(skipped="CPU only (the native kernel is the CPU's)")
            print(f"{mode:>16} skipped: CPU only")
            continue
        try:
            model = variant(base, mode)
        except ValueError as error:  # a group size that does not divide a width of this shape
            report["results"][mode] = dict(skipped=str(error))
            print(f"{mode:>16} skipped: {error}")
            continue
        read = weight_bytes(model) - model.transformer.wte.weight.numel() * model.transformer.wte.weight.element_size()
        for compiled in (False, True) if compile else (False,):
            name = mode + ("_compiled" if compiled else "")
            torch._dynamo.reset()  # each mode is a new model: compile it afresh, not as the nth recompile

            def decode(ids: torch.Tensor, new_tokens: int = max_new_tokens) -> torch.Tensor:
                return generate(model, ids, new_tokens, temperature=0.0, max_seq_length=max_seq_length,
                                compiled=compiled)

            # each run's bound read right after it: on a shared VM the rate memory is read at moves by 2x from minute
            # to minute, so one reading for the bench (or for a mode's minutes) made the fractions a matter of luck
            readings = []
            seconds, _ = time_decoding(decode, prompt, device, repeats,
                                       after_each=lambda: readings.append(read_bandwidth(device)))
            # the prefill (eager, compiled or not) timed alone and taken out: the rate is the decode steps'
            prefill_seconds, _ = time_decoding(lambda ids: decode(ids, 1), prompt, device, repeats)
            prefill = statistics.median(prefill_seconds)
            tokens_per_s = (max_new_tokens - 1) / (statistics.median(seconds) - prefill)
            fractions = [(max_new_tokens - 1) / (run - prefill) * read / bandwidth
                         for run, bandwidth in zip(seconds, readings)]
            fraction, bandwidth = statistics.median(fractions), statistics.median(readings)
            verify = verify_costs(model, prompt, max_k, max_seq_length, compiled) if max_k else []
            fp32 = report["results"].get("fp32", {}).get("tokens_per_s")
            report["results"][name] = dict(kernels=describe(model) if mode.startswith("int") else "F.linear",
                                           weight_bytes_per_token=read, tokens_per_s=tokens_per_s, seconds=seconds,
                                           prefill_seconds=prefill_seconds,
                                           read_bandwidth_gb_per_s=[reading / 1e9 for reading in readings],
                                           fraction_of_bandwidth_bound=fraction,
                                           fractions_of_bandwidth_bound=fractions, verify_steps=verify)
            print(f"{name:>16} {read / 1e6:9.1f} {tokens_per_s:9.1f} {prefill * 1e3:8.1f} "
                  f"{(f'{tokens_per_s / fp32:7.2f}x' if fp32 else '        ')} "
                  f"{fraction:8.1%} {bandwidth / 1e9:7.1f}  {min(fractions):.0%}-{max(fractions):.0%}  "
                  f"{' '.join(f'{v:.2f}' for v in verify)}")
            if output is not None:
                write_json(output, report)
    if output is not None:
        write_json(output, report)  # with the modes skipped after the last one measured
        print(f"Wrote {output}")
    return report


def variant(base: GPT, mode: str) -> GPT:
    """A copy of the float model in `mode`, prepared for its device (bf16 activations for the quantized kernels)."""
    model = copy.deepcopy(base)
    if mode in ("fp32", "bf16"):
        return model.to(torch.float32 if mode == "fp32" else torch.bfloat16)
    quantization = Quantization("int8") if mode.startswith("int8") else Quantization("int4", int(mode.split("_g")[1]))
    return quantize_for_inference(model, quantization, torch.float32 if mode == "int8_fp32" else torch.bfloat16,
                                  triton=not mode.endswith("_no_triton"), native=not mode.endswith("_no_native"))


@torch.inference_mode()
def verify_costs(model: GPT, prompt: torch.Tensor, max_k: int, max_seq_length: int, compiled: bool = False,
                 repeats: int = 5) -> list:
    """The time of one forward of k + 1 tokens after the prompt (a speculative verify), k = 1..max_k, in one-token
    decode steps; the best of `repeats` each. compiled: each length through a step compiled for it alone, the way a
    speculative run with one k compiles its verify (`generation.compiled_step`; a step compiled for several lengths
    runs the dynamic-shape code)."""
    T = prompt.numel()
    device = prompt.device
    model.set_kv_cache(batch_size=1, max_seq_length=max_seq_length)
    model(prompt[None], torch.arange(T, device=device))

    def best(n: int) -> float:
        idx, positions = prompt[None, :1].repeat(1, n), torch.arange(T, T + n, device=device)
        forward = verify_logits
        if compiled:
            torch._dynamo.reset()
            forward = compiled_step(verify_logits, device)
        forward(model, idx, positions)
        times = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            forward(model, idx, positions)
            synchronize(device)
            times.append(time.perf_counter() - start)
        return min(times)

    one = best(1)
    return [best(k + 1) / one for k in range(1, max_k + 1)]


if __name__ == "__main__":
    cli(main)
