"""Generate text from a checkpoint directory (lit_model.pth, model_config.json, tokenizer).

gpt-fast style: the prompt is prefilled in one forward pass into a static KV cache, then tokens are decoded one at a
time with fixed shapes (a (1, 1) token, a (1,) position, a cache of constant size) and no host syncs in the step,
so the decode step can later be compiled or captured in a CUDA graph.

    python generate/base.py --checkpoint_dir out/demo/final --prompt "def fibonacci(n):" --max_new_tokens 100
"""

import sys
import time
from pathlib import Path
from typing import Literal, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpoint import load_model
from model import GPT
from tokenizer import Tokenizer
from utils import cli

PRECISIONS = {"32-true": torch.float32, "bf16-true": torch.bfloat16, "16-true": torch.float16}
# A per-token `.item()` makes the host wait for the device after every step, so it can no longer queue the next
# step's kernels while the device works. Checking for EOS every few tokens costs at most this many - 1 wasted steps.
EOS_CHECK_INTERVAL = 8


def check_generation_args(max_new_tokens: int, temperature: float, top_k: Optional[int], top_p: float) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1 (or None for no top-k filtering), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def logits_to_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                    top_p: float = 1.0) -> torch.Tensor:
    """Sampling distribution over the last dimension: temperature, then top-k, then nucleus (top-p) filtering."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        # keep exactly the k largest (a threshold `logits < kth` would keep every tie of the k-th value)
        values, indices = torch.topk(logits, top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, indices, values)
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        # the smallest set of most likely tokens whose mass reaches top_p: keep a token if the mass before it is
        # below top_p (the most likely token is always kept)
        sorted_probs, sorted_indices = torch.sort(probs, dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, sorted_indices, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
           top_p: float = 1.0) -> torch.Tensor:
    """Token ids (int64) of shape logits.shape[:-1]; temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    # Exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) is distributed as Categorical(p), like torch.multinomial
    # but without its host sync. Filtered tokens have p_i = 0 and can never win.
    race = torch.empty_like(probs).exponential_(1)
    return torch.argmax(probs / race, dim=-1)


def next_token(model: GPT, idx: torch.Tensor, input_pos: torch.Tensor, **sampling) -> torch.Tensor:
    """Feed idx (1, T) at positions input_pos (T,) through the KV cache and sample the token that follows."""
    logits = model(idx, input_pos)
    # sample only among the real vocabulary, never the rows that pad the embedding to a multiple of 64
    return sample(logits[0, -1, : model.config.vocab_size], **sampling)


@torch.inference_mode()
def generate(model: GPT, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: float = 1.0, eos_id: Optional[int] = None) -> torch.Tensor:
    """Return the 1-D prompt followed by up to `max_new_tokens` new tokens, ending at the first `eos_id` if any.

    The whole sequence never exceeds `block_size`: fewer tokens are generated when the prompt leaves less room.
    Sets the model's KV cache to batch size 1 and the length needed.
    """
    check_generation_args(max_new_tokens, temperature, top_k, top_p)
    if prompt_ids.dim() != 1 or prompt_ids.numel() == 0:
        raise ValueError(f"prompt_ids must be a non-empty 1-D tensor, got shape {tuple(prompt_ids.shape)}")
    T = prompt_ids.numel()
    block_size = model.config.block_size
    if T >= block_size:
        raise ValueError(f"The prompt has {T} tokens; it must be shorter than block_size={block_size}")
    device = model.lm_head.weight.device
    max_seq_length = min(T + max_new_tokens, block_size)
    model.set_kv_cache(batch_size=1, max_seq_length=max_seq_length, device=device)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)

    tokens = torch.empty(max_seq_length, dtype=torch.long, device=device)
    tokens[:T] = prompt_ids
    token = next_token(model, tokens[:T].view(1, -1), torch.arange(T, device=device), **sampling)
    tokens[T] = token
    eos_seen = token == eos_id if eos_id is not None else None
    input_pos = torch.tensor([T], device=device)
    length = max_seq_length
    for i in range(T + 1, max_seq_length):
        if eos_seen is not None and (i - T) % EOS_CHECK_INTERVAL == 0 and eos_seen.item():
            length = i
            break
        token = next_token(model, token.view(1, 1), input_pos, **sampling)
        tokens[i] = token
        input_pos += 1
        if eos_seen is not None:
            eos_seen |= token == eos_id
    tokens = tokens[:length]
    if eos_id is not None:
        eos_positions = (tokens[T:] == eos_id).nonzero()
        if len(eos_positions):
            tokens = tokens[: T + eos_positions[0].item() + 1]
    return tokens


def main(
    checkpoint_dir: Path,
    prompt: str = "Hello, my name is",
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: Optional[int] = 200,
    top_p: float = 1.0,
    seed: int = 1234,
    precision: Optional[Literal["32-true", "bf16-true", "16-true"]] = None,
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
    """
    check_generation_args(max_new_tokens, temperature, top_k, top_p)
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"Checkpoint directory {str(checkpoint_dir)!r} does not exist")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = precision or ("bf16-true" if device.type == "cuda" else "32-true")
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}; expected one of {list(PRECISIONS)}")
    torch.manual_seed(seed)

    tokenizer = Tokenizer(checkpoint_dir)
    t0 = time.perf_counter()
    model = load_model(checkpoint_dir, device=device, dtype=PRECISIONS[precision])
    print(f"Loaded {checkpoint_dir} in {time.perf_counter() - t0:.2f} s ({precision} on {device})", file=sys.stderr)
    tokenizer.check_fits(model.config.vocab_size, str(checkpoint_dir / "model_config.json"))

    prompt_ids = torch.tensor(tokenizer.encode(prompt, bos=tokenizer.bos_id is not None), dtype=torch.int,
                              device=device)
    room = model.config.block_size - len(prompt_ids)
    if 0 < room < max_new_tokens:
        print(f"Only {room} new tokens fit in block_size={model.config.block_size} after the "
              f"{len(prompt_ids)}-token prompt", file=sys.stderr)

    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    output = generate(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                      eos_id=tokenizer.eos_id)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0

    print(tokenizer.decode(output))
    n_new = len(output) - len(prompt_ids)
    print(f"Generated {n_new} tokens in {elapsed:.2f} s: {n_new / elapsed:.2f} tokens/s on {device}", file=sys.stderr)
    if device.type == "cuda":
        print(f"Memory used: {torch.cuda.max_memory_allocated() / 1e9:.02f} GB", file=sys.stderr)


if __name__ == "__main__":
    cli(main)
