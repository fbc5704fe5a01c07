"""Generate text from a checkpoint directory (lit_model.pth, model_config.json, tokenizer): the command line of
generation.py (the prompt prefilled into a static KV cache, then one token at a time with fixed shapes).

    python generate/base.py --checkpoint_dir out/demo/final --prompt "def fibonacci(n):" --max_new_tokens 100
    python generate/base.py --checkpoint_dir out/demo/final --prompt "def fibonacci(n):" --compile

With --compile the KV cache's length is the prompt plus --max_new_tokens rounded up to a multiple of 256 (or
--max_seq_length), so that runs of similar lengths reuse the compiled step; the prefill stays eager.
"""

import sys
import time
from pathlib import Path
from typing import Literal, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from generation import (
    check_generation_args, compiled_cache_length, encode_prompt, generate, load_for_generation, synchronize,
)
from quantize import QuantizeMode
from utils import cli


def main(
    checkpoint_dir: Path,
    prompt: str = "Hello, my name is",
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: Optional[int] = 200,
    top_p: float = 1.0,
    seed: int = 1234,
    precision: Optional[Literal["32-true", "bf16-true", "16-true"]] = None,
    compile: bool = False,
    max_seq_length: Optional[int] = None,
    quantize: Optional[QuantizeMode] = None,
    group_size: int = 64,
) -> None:
    """Print the prompt and its continuation; the speed goes to stderr.

    Args:
        checkpoint_dir: directory with lit_model.pth, model_config.json and the tokenizer
        prompt: the text to continue
        max_new_tokens: how many tokens to generate at most (fewer at EOS or at the block size)
        temperature: sampling temperature; 0 is greedy decoding
        top_k: sample among the k most likely tokens only; none disables it
        top_p: nucleus sampling: the smallest set of tokens whose probability reaches top_p
        seed: random seed for sampling
        precision: 32-true, bf16-true or 16-true; default bf16-true on CUDA, 32-true on CPU
        compile: compile the one-token decode step (CUDA graphs on CUDA); a warm-up run compiles it before timing
        max_seq_length: KV cache length; default the prompt plus max_new_tokens, with --compile rounded up to a
            multiple of 256 (a step on a GPU reads every slot: docs/generation.md)
        quantize: int8 or int4 weight-only quantization of the linear layers at load (quantize.py); none: as stored
        group_size: int4's group of input channels: 32, 64 or 128
    """
    check_generation_args(max_new_tokens, temperature, top_k, top_p)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_for_generation(checkpoint_dir, device, precision, quantize, group_size)
    prompt_ids = encode_prompt(tokenizer, prompt, device)
    if compile:
        max_seq_length = max_seq_length or compiled_cache_length(len(prompt_ids), max_new_tokens,
                                                                 model.config.block_size)
    room = min(max_seq_length or model.config.block_size, model.config.block_size) - len(prompt_ids)
    if 0 < room < max_new_tokens:
        print(f"Only {room} new tokens fit after the {len(prompt_ids)}-token prompt", file=sys.stderr)
    settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, max_seq_length=max_seq_length,
                    compiled=compile, stop_ids=[] if tokenizer.eos_id is None else [tokenizer.eos_id])
    if compile:
        t0 = time.perf_counter()
        generate(model, prompt_ids, 2, **settings)
        print(f"Compiled the decode step in {time.perf_counter() - t0:.2f} s", file=sys.stderr)

    torch.manual_seed(seed)
    synchronize(device)
    t0 = time.perf_counter()
    output = generate(model, prompt_ids, max_new_tokens, **settings)
    synchronize(device)
    elapsed = time.perf_counter() - t0

    print(tokenizer.decode(output))
    n_new = len(output) - len(prompt_ids)
    print(f"Generated {n_new} tokens in {elapsed:.2f} s: {n_new / elapsed:.2f} tokens/s on {device}", file=sys.stderr)
    if device.type == "cuda":
        print(f"Memory used: {torch.cuda.max_memory_allocated() / 1e9:.02f} GB", file=sys.stderr)


if __name__ == "__main__":
    cli(main)
