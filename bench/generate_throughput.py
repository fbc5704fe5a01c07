r"""Batch-1 greedy decoding speed of our model, eager and compiled, against Hugging Face's `generate` with a static
KV cache on the same weights, side by side in one run, with the fraction of the memory-bandwidth bound each reaches.

On the CPU (2 cores, fp32; run it alone: a second torch process slows both several times):

    python bench/generate_throughput.py --model_name AMD-Llama-135m --max_new_tokens 64 \
        --output out/bench/generate_cpu_135m.json

On one GPU, bf16 (the goals of issue 11: >= 1,000 tokens/s for TinyLlama-1.1B, >= 3,000 for AMD-Llama-135m):

    python bench/generate_throughput.py --model_name tiny_LLaMA_1b --max_new_tokens 256 \
        --output out/bench/generate_cuda_tinyllama.json
    python bench/generate_throughput.py --model_name AMD-Llama-135m --max_new_tokens 256 \
        --output out/bench/generate_cuda_135m.json

Batch-1 decoding reads every weight once per token, so tokens/s can be at most the device's copy bandwidth divided
by the weight bytes a token reads (all parameters but the embedding table, of which it reads one row). The
bandwidth is measured here (a large device-to-device copy: bytes read + written per second). Each mode decodes the
same prompt `repeats` times after an untimed warm-up (which compiles), and the median gives tokens/s. Ours decodes
through generation.py's `generate` with a KV cache of fixed length (--compile: its one-token step compiled;
CUDA graphs on CUDA). The report also names the SDPA backend that our decode step's masked attention runs (from
one profiled step): see README "Fast generation" for why it is the one we want.
"""

import statistics
import sys
from pathlib import Path
from typing import List, Literal, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ATTENTION_OPS, copy_bandwidth, report_header, time_decoding  # noqa: E402
from checkpoint import named_config  # noqa: E402
from generation import PRECISIONS, default_precision, generate  # noqa: E402
from hf import hf_config, hf_state_dict  # noqa: E402
from model import GPT, Config, num_parameters  # noqa: E402
from utils import UserError, cli, write_json  # noqa: E402

MODES = ("eager", "compiled", "hf_static")


def main(
    model_name: str = "AMD-Llama-135m",
    precision: Optional[Literal["32-true", "bf16-true", "16-true"]] = None,
    prompt_length: int = 16,
    max_new_tokens: int = 128,
    repeats: int = 3,
    modes: Sequence[str] = MODES,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    output: Optional[Path] = None,
    seed: int = 1337,
) -> dict:
    """Time batch-1 greedy decoding of each mode on random weights; print a table and return (and write) the figures.

    Args:
        model_name: a config of model.py
        precision: 32-true, bf16-true or 16-true; none: bf16-true on CUDA, 32-true on the CPU
        prompt_length: tokens of the (random) prompt
        max_new_tokens: tokens decoded per run (every run decodes exactly this many: no EOS)
        repeats: timed runs per mode, after one untimed warm-up
        modes: eager (ours), compiled (ours, --compile), hf_static (transformers' generate, static cache)
        device: auto (CUDA if there is one), cpu or cuda
        output: write the figures here as JSON
        seed: seed of the weights and the prompt
    """
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        raise UserError(f"--modes {list(modes)}: expected some of {list(MODES)}")
    if repeats < 1 or max_new_tokens < 1 or prompt_length < 1:
        raise UserError(f"--repeats {repeats}, --max_new_tokens {max_new_tokens} and --prompt_length {prompt_length} "
                        f"must be at least 1")
    config = named_config(model_name)
    if prompt_length + max_new_tokens > config.block_size:
        raise UserError(f"--prompt_length {prompt_length} + --max_new_tokens {max_new_tokens} exceeds the "
                        f"block_size {config.block_size} of {model_name}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA device; use --device cpu")
    device = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    precision = precision or default_precision(device)
    dtype = PRECISIONS[precision]

    torch.manual_seed(seed)
    with device:
        model = GPT(config).to(dtype).eval()
    prompt = torch.randint(0, config.vocab_size, (prompt_length,), device=device)
    weight_bytes = (num_parameters(model) - model.transformer.wte.weight.numel()) * dtype.itemsize
    bandwidth = copy_bandwidth(device)
    report = {
        **report_header("bench/generate_throughput.py", device),
        "arguments": dict(model_name=model_name, precision=precision, prompt_length=prompt_length,
                          max_new_tokens=max_new_tokens, repeats=repeats, modes=list(modes), seed=seed),
        "weight_bytes_per_token": weight_bytes,
        "copy_bandwidth_gb_per_s": bandwidth / 1e9,
        "bandwidth_bound_tokens_per_s": bandwidth / weight_bytes,
        "decode_attention": decode_attention_backends(model, prompt),
        "results": {},
    }
    print(f"{report['device']}; torch {torch.__version__}. {model_name} in {precision}: {weight_bytes / 1e6:.0f} MB "
          f"of weights per token, copy bandwidth {bandwidth / 1e9:.1f} GB/s: at most "
          f"{report['bandwidth_bound_tokens_per_s']:.0f} tokens/s. Decode attention: "
          f"{', '.join(report['decode_attention']) or 'no fused SDPA op'}")

    max_seq_length = prompt_length + max_new_tokens
    outputs = {}
    for mode in [m for m in MODES if m in modes]:
        if mode == "hf_static":
            decode = hf_decoder(model, config, dtype, max_new_tokens)
        else:
            decode = our_decoder(model, max_new_tokens, max_seq_length, compiled=mode == "compiled")
        seconds, outputs[mode] = time_decoding(decode, prompt, device, repeats)
        tokens_per_s = max_new_tokens / statistics.median(seconds)
        fraction = tokens_per_s / report["bandwidth_bound_tokens_per_s"]
        report["results"][mode] = dict(seconds=seconds, tokens_per_s=tokens_per_s, fraction_of_bandwidth_bound=fraction)
        print(f"{mode:>10}: {tokens_per_s:10.1f} tokens/s, {fraction:.1%} of the bandwidth bound (median of {repeats})")
        if output is not None:
            write_json(output, report)
    first = next(iter(outputs.values()))
    report["same_tokens"] = {mode: ids == first for mode, ids in outputs.items()}  # exact in fp32; bf16 may differ
    if output is not None:
        write_json(output, report)
        print(f"Wrote {output}")
    return report


def decode_attention_backends(model: GPT, prompt: torch.Tensor) -> List[str]:
    """The SDPA backends one eager decode step runs (masked attention over the static cache, grouped heads)."""
    from torch.profiler import profile

    T = prompt.numel()
    model.set_kv_cache(batch_size=1, max_seq_length=T + 1)
    with torch.inference_mode():
        model(prompt[None], torch.arange(T, device=prompt.device))
        with profile() as profiler:
            model(prompt[None, -1:], torch.tensor([T], device=prompt.device))
    names = {event.key for event in profiler.key_averages()}
    backends = (next((backend for op, backend in ATTENTION_OPS if op in name), None) for name in names)
    return sorted({backend for backend in backends if backend})


def our_decoder(model: GPT, max_new_tokens: int, max_seq_length: int, compiled: bool):
    """generation.py's greedy `generate`, as a function of the 1-D prompt."""
    def decode(prompt: torch.Tensor) -> torch.Tensor:
        return generate(model, prompt, max_new_tokens, temperature=0.0, max_seq_length=max_seq_length,
                        compiled=compiled)

    return decode


def hf_decoder(model: GPT, config: Config, dtype: torch.dtype, max_new_tokens: int):
    """transformers' greedy `generate` with `cache_implementation="static"` on our weights, as a function of the
    prompt returning the 1-D prompt and continuation."""
    from transformers import LlamaConfig, LlamaForCausalLM

    device = model.transformer.wte.weight.device
    hf_cfg = LlamaConfig(**hf_config(config, str(dtype).removeprefix("torch."), None, None))
    with device:
        hf = LlamaForCausalLM(hf_cfg).to(dtype).eval()
    hf.load_state_dict(hf_state_dict(model.state_dict(), config), strict=False)

    def decode(prompt: torch.Tensor) -> torch.Tensor:
        return hf.generate(prompt[None], max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                           do_sample=False, cache_implementation="static", pad_token_id=0)[0]

    return decode


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)
    cli(main)
