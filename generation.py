"""Generation: sampling, the KV-cache decode loop, its compiled step, and loading a checkpoint for generation; the
library of generate/base.py (its CLI), chat, speculative decoding, the evaluation, the demos and the benches.

gpt-fast style: the prompt is prefilled in one forward pass into a static KV cache, then tokens are decoded one at a
time with fixed shapes (a (1, 1) token, a (1,) position, a cache of constant size) and no host syncs in the step,
so the decode step can be compiled and captured in a CUDA graph (`compiled=True`).
"""

import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from checkpoint import load_model, quantization_of
from model import GPT, find_multiple
from quantize import Quantization, activation_dtype, describe, prepare_compiled_decode, quantize_for_inference
from tokenizer import Tokenizer
from utils import UserError

# the weights' dtype by precision name; float64 for exactness checks against references (near-ties cannot flip an
# argmax there), as the tests and eval's 64-true use it
PRECISIONS = {"32-true": torch.float32, "bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}
# A per-token `.item()` makes the host wait for the device after every step, so it can no longer queue the next
# step's kernels while the device works. Checking for a stop id every few tokens costs at most this many - 1 wasted
# steps (with `on_token`, streaming needs the sync anyway and each token is checked).
STOP_CHECK_INTERVAL = 8
# a compiled decode's KV cache length is rounded up to a multiple of this (compiled_cache_length)
CACHE_LENGTH_MULTIPLE = 256


def check_generation_args(max_new_tokens: int, temperature: float, top_k: Optional[int], top_p: float) -> None:
    """Refuse sampling settings that generate nothing or make no distribution, naming the flag."""
    if max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be at least 1, got {max_new_tokens}")
    if not temperature >= 0:  # written so that NaN fails it too
        raise UserError(f"--temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"--top_k must be at least 1 (or none for no top-k filtering), got {top_k}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], got {top_p}")


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
    return sample_probs(logits_to_probs(logits, temperature, top_k, top_p))


def sample_probs(probs: torch.Tensor) -> torch.Tensor:
    """Token ids (int64) of shape probs.shape[:-1], drawn from the distributions `probs` (..., vocab)."""
    # Exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) is distributed as Categorical(p), like torch.multinomial
    # but without its host sync. Filtered tokens have p_i = 0 and can never win.
    race = torch.empty_like(probs).exponential_(1)
    return torch.argmax(probs / race, dim=-1)


def last_logits(model: GPT, idx: torch.Tensor, input_pos: torch.Tensor,
                lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Feed idx (B, T) at positions input_pos, (T,) or (B, T), through the KV cache; the logits (B, vocab_size) after
    each row's last token: column lengths - 1, default the last column. The head runs on those positions only, and
    over the real vocabulary only, never the rows that pad the embedding to a multiple of 64."""
    hidden = model.hidden_states(idx, input_pos)
    last = hidden[:, -1] if lengths is None else hidden[torch.arange(idx.size(0), device=idx.device), lengths - 1]
    return model.lm_head(last)[:, : model.config.vocab_size]


def next_token(model: GPT, idx: torch.Tensor, input_pos: torch.Tensor, **sampling) -> torch.Tensor:
    """Feed idx (1, T) at positions input_pos (T,) through the KV cache and sample the token that follows: (1,)."""
    return sample(last_logits(model, idx, input_pos), **sampling)


def compiled_cache_length(prompt_length: int, max_new_tokens: int, block_size: int) -> int:
    """The KV cache length of a compiled decode of one prompt: the prompt plus max_new_tokens, rounded up to a
    multiple of CACHE_LENGTH_MULTIPLE so that runs of similar lengths share the compiled step (inductor's on-disk
    cache), at most the block size. Not the block size itself: a step on a GPU reads every slot of the cache (on the
    CPU a step attends the slots up to its position only: docs/generation.md)."""
    return min(block_size, find_multiple(prompt_length + max_new_tokens, CACHE_LENGTH_MULTIPLE))


def ensure_kv_cache(model: GPT, batch_size: int, max_seq_length: int) -> None:
    """Allocate the static KV cache unless the model already has one of this shape, dtype and device.

    Reusing it needs no reset: each prompt's prefill overwrites the slots it attends, and a query never attends a
    slot past its own position. Keeping the same tensors keeps a compiled decode step valid (no recompilation).
    """
    weight = model.transformer.wte.weight
    cache = model.transformer.h[0].attn.kv_cache
    if (cache is None or model.mask_cache is None or model.mask_cache.size(0) != max_seq_length
            or cache.k.size(0) != batch_size or cache.k.dtype != weight.dtype or cache.k.device != weight.device):
        model.set_kv_cache(batch_size=batch_size, max_seq_length=max_seq_length)


@torch.inference_mode()
def generate(model: GPT, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: float = 1.0, stop_ids: Sequence[int] = (),
             on_token: Optional[Callable[[int], None]] = None, max_seq_length: Optional[int] = None,
             compiled: bool = False) -> torch.Tensor:
    """Return the 1-D prompt followed by up to `max_new_tokens` new tokens, ending at the first generated id that is
    in `stop_ids` (kept in the output).

    on_token: called with each new token id as soon as it is sampled (one host sync per token: for streaming).
    max_seq_length: the KV cache length, fixed across calls so that a compiled step never recompiles; default the
        prompt plus max_new_tokens. The whole sequence never exceeds it nor `block_size`: fewer tokens are generated
        when the prompt leaves less room.
    compiled: decode with `compiled_step` (torch.compile; CUDA graphs on CUDA) after `prepare_compiled_decode`; the
        prefill stays eager.
    """
    check_generation_args(max_new_tokens, temperature, top_k, top_p)
    if prompt_ids.dim() != 1 or prompt_ids.numel() == 0:
        raise ValueError(f"prompt_ids must be a non-empty 1-D tensor, got shape {tuple(prompt_ids.shape)}")
    T = prompt_ids.numel()
    max_seq_length = max_seq_length or min(T + max_new_tokens, model.config.block_size)
    if T >= max_seq_length:
        limits = f"block_size={model.config.block_size}" + (
            f" and max_seq_length={max_seq_length}" if max_seq_length < model.config.block_size else "")
        raise UserError(f"The prompt has {T} tokens; it must be shorter than {limits}: shorten it")
    device = model.transformer.wte.weight.device
    ensure_kv_cache(model, batch_size=1, max_seq_length=max_seq_length)
    length = min(T + max_new_tokens, max_seq_length)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    if compiled:
        prepare_compiled_decode(model)
    step = compiled_step(next_token, device) if compiled else next_token

    tokens = torch.empty(length, dtype=torch.long, device=device)
    tokens[:T] = prompt_ids
    token = next_token(model, tokens[:T].view(1, -1), torch.arange(T, device=device), **sampling)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    stop_seen = torch.zeros(1, dtype=torch.bool, device=device)
    input_pos = torch.tensor([T], device=device)
    end = length
    for i in range(T, length):
        if i > T:
            # the clone: a CUDA graph's output is overwritten by its next replay
            token = step(model, token.view(1, 1), input_pos, **sampling).clone()
            input_pos += 1
        tokens[i] = token[0]
        if on_token is not None:
            token_id = token.item()
            on_token(token_id)
            if token_id in stop_ids:
                end = i + 1
                break
        elif len(stop_ids):
            stop_seen |= torch.isin(token, stops)
            if (i + 1 - T) % STOP_CHECK_INTERVAL == 0 and stop_seen.item():
                end = i + 1
                break
    # up to STOP_CHECK_INTERVAL - 1 tokens may follow the stop id
    return tokens[:end] if on_token is not None else cut_at_stop(tokens[:end], T, stops)


def cut_at_stop(sequence: torch.Tensor, prompt_length: int, stops: torch.Tensor) -> torch.Tensor:
    """sequence (L,) up to and including its first id after the prompt that is in `stops` (one host sync)."""
    stop_positions = torch.isin(sequence[prompt_length:], stops).nonzero()
    return sequence[: prompt_length + stop_positions[0].item() + 1] if len(stop_positions) else sequence


def compiled_step(step: Callable, device: torch.device) -> Callable:
    """`step` compiled once per device type, with CUDA graphs on CUDA ("reduce-overhead": the ~10 us launch of each of
    a decode step's hundreds of small kernels is what bounds batch-1 decoding there). Elsewhere the Python wrapper
    inductor writes runs at every step: without its checks of each input's and result's size and stride (dynamo's
    guards check the inputs already; ~240 calls a step of AMD-Llama-135m, 3-4% of its compiled int8 step)."""
    key = (step, device.type)
    if key not in _COMPILED:
        if device.type == "cuda":
            _COMPILED[key] = torch.compile(step, mode="reduce-overhead", fullgraph=True)
        else:
            compiled = torch.compile(step, fullgraph=True, options={"size_asserts": False})

            def windowed_step(*args, **kwargs):
                # the furthest position fed read as a size inside the graph: the step attends the cache's slots up to
                # it (model.GPT.hidden_states), one graph for every window
                with torch._dynamo.config.patch(capture_scalar_outputs=True):
                    return compiled(*args, **kwargs)

            _COMPILED[key] = windowed_step
    return _COMPILED[key]


_COMPILED: Dict[Tuple[Callable, str], Callable] = {}


def default_precision(device: torch.device) -> str:
    return "bf16-true" if device.type == "cuda" else "32-true"


def load_for_generation(checkpoint_dir: Path, device: torch.device, precision: Optional[str] = None,
                        quantize: Optional[str] = None, group_size: int = 64,
                        flag: str = "--quantize") -> Tuple[GPT, Tokenizer]:
    """The model of a checkpoint directory (`load_inference_model`) and its tokenizer, checked to fit the model's
    vocabulary."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"Checkpoint directory {str(checkpoint_dir)!r} does not exist")
    tokenizer = Tokenizer(checkpoint_dir)
    model = load_inference_model(checkpoint_dir, device, precision, quantize, group_size, flag)
    tokenizer.check_fits(model.config.vocab_size, str(checkpoint_dir / "model_config.json"))
    return model, tokenizer


def load_inference_model(checkpoint_dir: Path, device: torch.device, precision: Optional[str] = None,
                         quantize: Optional[str] = None, group_size: int = 64, flag: str = "--quantize") -> GPT:
    """The model of a checkpoint directory in `precision` (one of PRECISIONS; default bf16-true on CUDA, 32-true
    on CPU) on `device`, for inference.

    quantize: int8 or int4 (groups of `group_size`): quantize the linear layers at load (quantize.py); a checkpoint
        written by scripts/quantize.py is quantized already. A quantized model's precision is its activations' dtype,
        by default the one its kernels are fast in (quantize.activation_dtype). `flag` names the option in errors.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"Checkpoint directory {str(checkpoint_dir)!r} does not exist")
    stored = quantization_of(checkpoint_dir)
    if quantize is not None and stored is not None:
        raise UserError(f"{flag} {quantize}: {checkpoint_dir} is quantized already ({stored.mode})")
    quantized = quantize is not None or stored is not None
    if precision is None:
        precision = ("bf16-true" if activation_dtype(device) == torch.bfloat16 else "32-true") if quantized \
            else default_precision(device)
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r} is not one of {list(PRECISIONS)}")
    t0 = time.perf_counter()
    if quantize is None:
        model = load_model(checkpoint_dir, device=device, dtype=PRECISIONS[precision])
    else:
        model = load_model(checkpoint_dir, dtype=torch.float32)  # quantized from the float weights, on the CPU
        tied_head = ("lm_head",) if model.config.tie_embeddings else ()  # stays the embedding
        quantization = Quantization(quantize, group_size if quantize == "int4" else None, excluded=tied_head)
        try:
            model = quantize_for_inference(model, quantization, PRECISIONS[precision], device)
        except ValueError as error:
            raise UserError(f"{flag} {quantize} (--group_size {group_size}): {error}") from None
    print(f"Loaded {checkpoint_dir} in {time.perf_counter() - t0:.2f} s ({precision} on {device})", file=sys.stderr)
    if quantized:
        print(describe(model), file=sys.stderr)
    return model


def encode_prompt(tokenizer: Tokenizer, prompt: str, device: torch.device) -> torch.Tensor:
    """(T,) int64 ids of `prompt`, after BOS when the tokenizer has one."""
    ids = tokenizer.encode(prompt, bos=tokenizer.bos_id is not None)
    if not ids:  # an empty prompt and no BOS: there is nothing to continue
        raise UserError(f"--prompt {prompt!r} makes no token and {tokenizer.path} has no BOS token: give some text")
    return torch.tensor(ids, dtype=torch.long, device=device)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a host clock measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
