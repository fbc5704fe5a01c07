"""`SmallLlamaLM`: lm-evaluation-harness's model interface on our GPT, tokenizer and static KV cache, registered with
lm-eval as `small-llama` (eval/lm_eval_harness.py is its command line).

Its numbers are those of lm-eval's own `hf` backend (HFLM) on the exported model (scripts/convert_lit_checkpoint.py):
the same tokenization (BOS as the checkpoint's tokenizer adds it, the prefix token BOS), left truncation to the
block size, rolling windows and stop sequences. What differs is the cost: requests that share a context (the endings
of a multiple-choice question) compute it once, in one row with all the endings, each ending attending the context's
keys and values and its own; and the head (the vocabulary projection) runs only where a token is scored.
No transformers import; lm-eval is imported here and by the eval scripts only.
"""

from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from generation import last_logits, load_for_generation, sample
from model import GPT
from tokenizer import Tokenizer
from utils import UserError


class Unit:
    """One row of a forward: a context and the continuations scored from it.

    The row feeds the context, then each continuation but its last token; each continuation attends the context and
    its own tokens only (shared_context, below), so the context is computed once for all of them. `members` are
    (request index, continuation tokens)."""

    def __init__(self, context: Tuple[int, ...], members: List[Tuple[int, List[int]]]) -> None:
        self.context, self.members = context, members
        self.tokens = list(context)
        self.segments = [0] * len(context)
        # (position in the row, target token, request index) of every scored token; the hidden state at a position
        # predicts the token that follows it
        self.picks = []
        for segment, (index, continuation) in enumerate(members, start=1):
            rows = [len(context) - 1] + list(range(len(self.tokens), len(self.tokens) + len(continuation) - 1))
            self.picks += [(row, token, index) for row, token in zip(rows, continuation)]
            self.tokens += continuation[:-1]
            self.segments += [segment] * (len(continuation) - 1)
        # more than one continuation fed: the forward needs shared_context's mask, else plain causal attention does
        self.branched = sum(len(continuation) > 1 for _, continuation in members) > 1


@register_model("small-llama")
class SmallLlamaLM(TemplateLM):
    """lm-eval's model interface on our GPT, tokenizer and static KV cache.

    Either `checkpoint_dir` (a checkpoint directory) or `model` and `tokenizer` (already built, e.g. by a benchmark).
    `add_bos_token`: None follows the tokenizer (HF's default for the checkpoint: True for Llama); True or False
    overrides it, and False makes the prefix of an empty context EOS instead of BOS (lm-eval's default).
    `fabric`: a launched Fabric for several processes; its collectives serve lm-eval's all_gather / gather_object /
    barrier (lm-eval's evaluator splits the documents among ranks itself).
    """

    def __init__(self, checkpoint_dir: Optional[str] = None, batch_size: int = 16, device: Optional[str] = None,
                 precision: Optional[str] = None, add_bos_token: Optional[bool] = None, max_batch_size=None,
                 model: Optional[GPT] = None, tokenizer: Optional[Tokenizer] = None, fabric=None,
                 quantize: Optional[str] = None, group_size: int = 64) -> None:
        # max_batch_size: lm-eval passes it with batch_size when it builds a model by name; there is no automatic
        # batch size here, so it is unused
        super().__init__()
        self.fabric = fabric
        if fabric is not None:
            self._device = fabric.device
        else:
            self._device = torch.device(device if device not in (None, "auto") else
                                        "cuda" if torch.cuda.is_available() else "cpu")
        if model is None:
            if checkpoint_dir is None:
                raise ValueError("SmallLlamaLM needs checkpoint_dir, or model and tokenizer")
            model, tokenizer = load_for_generation(checkpoint_dir, self._device, precision, quantize, int(group_size))
        self.model, self.tokenizer = model.eval(), tokenizer
        self.checkpoint_dir = checkpoint_dir
        self._batch_size = int(batch_size)
        if self._batch_size < 1:
            raise UserError(f"--batch_size must be at least 1, got {batch_size}")
        self.add_bos_token = tokenizer.add_bos_token if add_bos_token is None else bool(add_bos_token)
        if self.add_bos_token and tokenizer.bos_id is None:
            raise UserError(f"--add_bos_token: {tokenizer.path} defines no BOS token")
        # tokens fed to the model (without padding) and forward passes, for bench/eval_throughput.py
        self.tokens_computed = 0
        self.forward_passes = 0

    # ---- what lm-eval asks of a model ----------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        # HFLM conditions an empty context on BOS (lm-eval's default is the end-of-text token)
        return self.tokenizer.bos_id if self.add_bos_token else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self.model.config.block_size

    @property
    def max_gen_toks(self) -> int:
        return 256

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def rank(self) -> int:
        return self.fabric.global_rank if self.fabric is not None else 0

    @property
    def world_size(self) -> int:
        return self.fabric.world_size if self.fabric is not None else 1

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's `tensor`, concatenated along dim 0 (a scalar gives (world_size,))."""
        if self.world_size == 1:
            return tensor
        gathered = self.fabric.all_gather(tensor)  # (world_size, *tensor.shape)
        return gathered.flatten(0, 1) if tensor.dim() else gathered

    def gather_object(self, obj, dst: int = 0):
        if self.world_size == 1:
            return [obj]
        gathered = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj, gathered, dst=dst)
        return gathered

    def barrier(self) -> None:
        if self.world_size > 1:
            self.fabric.barrier()

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None,
                   left_truncate_len: Optional[int] = None, **kwargs) -> List[int]:
        """As HFLM: BOS when the tokenizer adds it (or as asked), but not before a string that starts with the BOS
        text already (a rendered chat prompt); special tokens written in the text become their ids, as in HF."""
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        if add_special_tokens is None and self.tokenizer.bos_token and string.startswith(self.tokenizer.bos_token):
            bos = False
        # parsing special tokens costs a pass for their offsets: only where one is written
        parse_special = any(token in string for token in self.tokenizer.special_tokens)
        ids = self.tokenizer.encode(string, bos=bos and self.tokenizer.bos_id is not None, parse_special=parse_special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int]) -> str:
        """The text of `tokens` without the special tokens (HF's skip_special_tokens=True)."""
        special = set(self.tokenizer.special_tokens.values())
        return self.tokenizer.decode([token for token in tokens if token not in special])

    # ---- log-likelihoods ----------------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> List[Tuple[float, bool]]:
        """(log P(continuation | context), whether greedy decoding gives the continuation) of each request
        `((context, continuation) strings, context tokens, continuation tokens)`, in the order given."""
        results: List[Optional[Tuple[float, bool]]] = [None] * len(requests)
        by_context = {}
        for index, (_, context_tokens, continuation) in enumerate(requests):
            if not continuation:
                results[index] = (0.0, True)  # the empty string: probability 1, and what greedy decoding "gives"
                continue
            if len(continuation) > self.max_length:
                raise UserError(f"A continuation of {len(continuation)} tokens does not fit the block size "
                                f"{self.max_length} of the model: evaluate it on tasks with shorter answers")
            # left-truncated as HFLM: the last max_length + 1 tokens of context + continuation (the last one is
            # predicted, never fed)
            tokens = (list(context_tokens) + list(continuation))[-(self.max_length + 1):]
            if len(tokens) == len(continuation):
                raise ValueError("A request has no context token: lm-eval scores an empty context after the prefix "
                                 "token")
            by_context.setdefault(tuple(tokens[: len(tokens) - len(continuation)]), []).append((index, continuation))
        units = [unit for context, members in by_context.items() for unit in self._units(context, members)]
        # longest first, as HFLM: the first batch shows at once whether memory suffices
        units.sort(key=lambda unit: (-len(unit.tokens), unit.context))
        self.model.clear_kv_cache()  # one left by generate_until would turn the forwards below into cache writes
        for start in range(0, len(units), self.batch_size):
            for index, answer in self._score_batch(units[start: start + self.batch_size]):
                results[index] = answer
        return results

    def _units(self, context: Tuple[int, ...], members: List[Tuple[int, List[int]]]) -> Iterator[Unit]:
        """The rows of one context: as many continuations per row as fit the block size (all of them, unless the
        context nearly fills it; a continuation alone always fits, left truncation saw to that)."""
        chunk: List[Tuple[int, List[int]]] = []
        length = len(context)
        for member in members:
            if chunk and length + len(member[1]) - 1 > self.max_length:
                yield Unit(context, chunk)
                chunk, length = [], len(context)
            chunk.append(member)
            length += len(member[1]) - 1
        yield Unit(context, chunk)

    @torch.inference_mode()
    def _score_batch(self, units: List[Unit]) -> List[Tuple[int, Tuple[float, bool]]]:
        """One forward over the units' rows (right-padded), the head applied to the scored positions only."""
        device, model = self.device, self.model
        length = max(len(unit.tokens) for unit in units)
        idx = pad_right([unit.tokens for unit in units], length, device)
        if any(unit.branched for unit in units):
            # padding is a segment of its own: it attends the context and itself, never a continuation
            segments = pad_right([unit.segments for unit in units], length, device, value=-1)
            input_pos, attention_mask = shared_context(segments)
            hidden = model.hidden_states(idx, input_pos, attention_mask)
        else:  # right padding comes after every real token, so causal attention never sees it
            hidden = model.hidden_states(idx)
        self.tokens_computed += sum(len(unit.tokens) for unit in units)
        self.forward_passes += 1

        picks = [(row, position, token, index) for row, unit in enumerate(units)
                 for position, token, index in unit.picks]
        rows, positions, targets = (torch.tensor(column, device=device) for column in list(zip(*picks))[:3])
        logits = model.lm_head(hidden[rows, positions])  # (picks, V)
        # the log-softmax over the whole (padded) vocabulary in at least fp32, as HFLM on the exported model (whose
        # vocabulary is the padded one)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        log_probs = F.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
        misses = logits.argmax(dim=-1) != targets
        indices = sorted({index for unit in units for index, _ in unit.members})
        position = {index: i for i, index in enumerate(indices)}
        request = torch.tensor([position[pick[3]] for pick in picks], device=device)
        totals = torch.zeros(len(indices), dtype=torch.float64, device=device)
        totals.index_add_(0, request, log_probs.double())
        missed = torch.zeros(len(indices), dtype=torch.long, device=device).index_add_(0, request, misses.long())
        # one host sync per batch
        return [(index, (total, miss == 0)) for index, total, miss in zip(indices, totals.tolist(), missed.tolist())]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        """Log-likelihood of each whole text, over lm-eval's disjoint rolling windows of the block size (as HFLM:
        the text is tokenized with BOS when the tokenizer adds one, and the first window is conditioned on the
        prefix token)."""
        windows, owners = [], []
        for owner, (string,) in enumerate(request.args for request in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append(((None, None), context, continuation))
                owners.append(owner)
        totals = [0.0] * len(requests)
        for owner, (log_prob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += log_prob
        return totals

    # ---- generation ---------------------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        """Batched KV-cache decoding of each (context, gen_kwargs) request until a stop sequence (`until`, and the
        EOS text as HFLM adds it), EOS or max_gen_toks; greedy unless gen_kwargs sample (do_sample, temperature,
        top_k, top_p). The text returned ends before the first stop sequence."""
        results: List[Optional[str]] = [None] * len(requests)
        by_kwargs = {}
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            by_kwargs.setdefault(repr(sorted(gen_kwargs.items())), []).append((index, context, gen_kwargs))
        eos_text = self.tokenizer.decode([self.eot_token_id]) or self.tokenizer.eos_token
        for group in by_kwargs.values():
            kwargs = normalize_gen_kwargs(group[0][2], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen_toks = kwargs.pop("max_gen_toks")
            if max_gen_toks >= self.max_length:
                raise UserError(f"max_gen_toks={max_gen_toks} leaves no room for a context in the block size "
                                f"{self.max_length}")
            sampling = sampling_args(kwargs)
            encoded = [(index, self.tok_encode(context, left_truncate_len=self.max_length - max_gen_toks))
                       for index, context, _ in group]
            encoded.sort(key=lambda item: (-len(item[1]), item[1]))
            for start in range(0, len(encoded), self.batch_size):
                batch = encoded[start: start + self.batch_size]
                texts = self._generate_batch([ids for _, ids in batch], max_gen_toks, until, sampling)
                for (index, _), text in zip(batch, texts):
                    results[index] = postprocess_generated_text(text, until, think_end_token=None)
        return results

    @torch.inference_mode()
    def _generate_batch(self, prompts: List[List[int]], max_gen_toks: int, until: List[str],
                        sampling: dict) -> List[str]:
        """The texts generated after each prompt (right-padded into one prefill; each row then decodes at its own
        position), up to EOS (excluded) or the first stop sequence (included, cut by the caller)."""
        device, model = self.device, self.model
        lengths = torch.tensor([len(ids) for ids in prompts], device=device)
        prompt_length = max(len(ids) for ids in prompts)
        model.set_kv_cache(len(prompts), prompt_length + max_gen_toks, device=device)
        logits = last_logits(model, pad_right(prompts, prompt_length, device),
                             torch.arange(prompt_length, device=device), lengths)
        self.tokens_computed += sum(len(ids) for ids in prompts)
        token = sample(logits, **sampling)
        generated: List[List[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        for step in range(max_gen_toks):
            # one host sync per step: stop sequences are text, checked on the decoded tokens
            for row, token_id in enumerate(token.tolist()):
                if done[row]:
                    continue
                if token_id == self.eot_token_id:
                    done[row] = True
                    continue
                generated[row].append(token_id)
                done[row] = any(stop and stop in self.tok_decode(generated[row]) for stop in until)
            if all(done) or step == max_gen_toks - 1:
                break
            logits = last_logits(model, token[:, None], (lengths + step)[:, None])
            self.tokens_computed += len(prompts)
            token = sample(logits, **sampling)
        return [self.tok_decode(ids) for ids in generated]

    # ---- chat ---------------------------------------------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        """Names the tokenizer and chat template in lm-eval's request caches."""
        return str(self.tokenizer.path).replace("/", "__")

    def chat_template(self, chat_template=False) -> Optional[str]:
        """The source of the chat template that --apply_chat_template renders with: the checkpoint's own (True), or
        a built-in name or .jinja path (a string); None when disabled."""
        from chat_template import resolve_chat_template

        if chat_template is False or chat_template is None:
            return None
        self._chat_template = resolve_chat_template(self.checkpoint_dir, None if chat_template is True
                                                    else chat_template)
        return self._chat_template.source

    def apply_chat_template(self, chat_history: List[dict], add_generation_prompt: bool = True) -> str:
        """The rendered prompt, as HFLM's: transformers' apply_chat_template(tokenize=False) that continues the last
        message when no generation prompt is asked for (lm-eval's `gen_prefix`); a template that refuses a system
        message is rendered without it."""
        if getattr(self, "_chat_template", None) is None:
            self.chat_template(True)
        render = dict(add_generation_prompt=add_generation_prompt, continue_final_message=not add_generation_prompt,
                      special_tokens=self._chat_template.special_tokens(self.tokenizer))
        try:
            return self._chat_template.render(chat_history, **render)
        except UserError:  # the template's refusal (raise_exception)
            return self._chat_template.render([message for message in chat_history if message["role"] != "system"],
                                              **render)


def pad_right(rows: List[Sequence[int]], length: int, device: torch.device, value: int = 0) -> torch.Tensor:
    """(len(rows), length) int64, each row padded with `value` after its tokens."""
    padded = torch.full((len(rows), length), value, dtype=torch.long)
    for i, tokens in enumerate(rows):
        padded[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return padded.to(device)


def sampling_args(kwargs: dict) -> dict:
    """generation.py's sampling arguments from lm-eval's normalized gen_kwargs (temperature 0: greedy)."""
    unknown = set(kwargs) - {"do_sample", "temperature", "top_k", "top_p"}
    if unknown:
        raise UserError(f"gen_kwargs {sorted(unknown)} are not supported: use do_sample, temperature, top_k, top_p, "
                        f"until and max_gen_toks")
    if not kwargs.get("do_sample"):
        return dict(temperature=0.0)
    temperature = float(kwargs.get("temperature") or 1.0)  # do_sample without a temperature: HF's default 1.0
    return dict(temperature=temperature, top_k=kwargs.get("top_k"), top_p=float(kwargs.get("top_p", 1.0)))


def shared_context(segment_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """input_pos (B, T) and attention_mask (B, T, T) for rows that hold a context followed by several continuations
    (the endings of a multiple-choice question), for a forward without a KV cache: the context is computed once, and
    each continuation attends the context and its own earlier tokens only, at the positions that follow the context,
    so each gets exactly what it would get as the one continuation after the context.

    segment_ids: (B, T) integers, 0 on the context (first in the row), then one id per continuation, each continuation
    contiguous; padding takes an id of its own.
    """
    if segment_ids.dim() != 2:
        raise ValueError(f"segment_ids must be (B, T), got shape {tuple(segment_ids.shape)}")
    key, query = segment_ids[:, None, :], segment_ids[:, :, None]
    mask = ((key == 0) | (key == query)).tril()
    # a token's position is the number of earlier tokens it attends: the context and its own continuation's
    return mask.sum(-1) - 1, mask
