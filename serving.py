"""Continuous batching: many requests decoded together in the rows of one static KV cache.

A request waits in a queue until a cache row is free; it is then prefilled on its own into that row (the model's
`rows=` cache write, position 0 up, while the other rows keep their cache), and from then on every step feeds each
active row's last token at that row's own position in one forward pass. A row stops on its own (EOS or an end-of-turn
id, a stop string, its token budget or the end of the cache) and is free for the next request at the next step, so
a short request submitted during a long one finishes first. The library of generate/serve.py.

Each request samples with its own settings and, given a seed, its own torch.Generator: a seeded request draws the same
random numbers whatever else runs. Its text is exactly reproducible when its logits are: in float64, or in any dtype
with greedy decoding away from near-ties (a batched forward may round differently from a forward of one row).
"""

import queue
import threading
from dataclasses import dataclass
from collections import deque
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple, Union

import torch

from generation import ensure_kv_cache, logits_to_probs
from model import GPT
from tokenizer import StreamDecoder, Tokenizer


class RequestError(ValueError):
    """A request the engine refuses (a prompt or a budget that does not fit the cache, bad sampling settings)."""

    def __init__(self, message: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.param = param


class QueueFull(RuntimeError):
    """The waiting queue holds `max_queue` requests already: try again later."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops.

    max_tokens: the most tokens to generate; None: until the end of the cache.
    temperature: 0 is greedy (argmax); top_k / top_p filter the distribution as generation.logits_to_probs does.
    stop: strings that end the text; the text never contains any of them, nor any first characters of one.
    stop_ids: token ids that end the text (EOS, the chat template's end of turn); they are not part of the text.
    seed: seeds the request's own generator; None draws from torch's global generator.
    """
    max_tokens: Optional[int] = None
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: float = 1.0
    stop: Sequence[str] = ()
    stop_ids: Sequence[int] = ()
    seed: Optional[int] = None

    def check(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, got {self.max_tokens}", "max_tokens")
        if not 0 <= self.temperature:  # written so that NaN fails it too
            raise RequestError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}", "temperature")
        if self.top_k is not None and self.top_k < 1:
            raise RequestError(f"top_k must be at least 1, got {self.top_k}", "top_k")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if any(not s for s in self.stop):
            raise RequestError("a stop string must not be empty", "stop")


@dataclass(frozen=True)
class Finished:
    """The last event of a request: why it ended ("stop", "length", "cancelled" or "error") and its token counts."""
    reason: str
    prompt_tokens: int
    completion_tokens: int
    error: Optional[str] = None


Event = Union[str, Finished]  # a piece of text, or the end


class Request:
    """One generation: its prompt ids, settings and the events it emits (text pieces, then one `Finished`) through
    `listener`, by default into `self.events` (a queue.Queue) for a thread to read."""

    def __init__(self, prompt_ids: List[int], params: SamplingParams, tokenizer: Tokenizer,
                 listener: Optional[Callable[[Event], None]] = None) -> None:
        self.prompt_ids, self.params = prompt_ids, params
        self.events: "queue.Queue[Event]" = queue.Queue()
        self.listener = listener or self.events.put
        self.cancelled = threading.Event()
        self.decoder = StreamDecoder(tokenizer)
        self.text = ""  # the text decoded so far
        self.sent = 0  # how much of it has been emitted
        self.generated = 0  # tokens generated, a stop id included
        self.row: Optional[int] = None
        self.position = 0  # where the next token goes in the row's cache
        self.next_token: Optional[int] = None  # sampled, not yet fed
        self.generator: Optional[torch.Generator] = None
        self.finished: Optional[Finished] = None

    def cancel(self) -> None:
        """Stop this request at the engine's next step (a client that went away): its row is freed."""
        self.cancelled.set()

    def result(self, timeout: Optional[float] = None) -> Tuple[str, Finished]:
        """Block until the request ends (default listener only); returns its whole text and its `Finished`."""
        pieces = []
        while True:
            event = self.events.get(timeout=timeout)
            if isinstance(event, Finished):
                return "".join(pieces), event
            pieces.append(event)

    def add_text(self, piece: str) -> bool:
        """Take `piece` of decoded text and emit what can no longer become a stop string; True at a stop string."""
        self.text += piece
        stops = self.params.stop
        if stops:
            # nothing emitted can start a stop string (it was held back), so a match starts at `sent` or later
            found = [i for i in (self.text.find(s, self.sent) for s in stops) if i >= 0]
            if found:
                self.emit(self.text[self.sent: min(found)])
                return True
            hold = max((k for s in stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        else:
            hold = 0
        self.emit(self.text[self.sent: len(self.text) - hold])
        return False

    def emit(self, text: str) -> None:
        if text:
            self.sent += len(text)
            self.listener(text)

    def finish(self, reason: str, error: Optional[str] = None) -> None:
        self.finished = Finished(reason, len(self.prompt_ids), self.generated, error)
        self.listener(self.finished)


class Engine:
    """The scheduler: `submit` queues a request (from any thread); `step` admits queued requests into free rows and
    decodes every active row once; `start` runs steps in a background thread until `stop`.

    max_batch_size: the KV cache's rows, the most requests decoded at once (1: requests run one after another).
    max_seq_length: the cache length, the longest prompt plus answer; default the model's block size.
    max_queue: the most requests waiting for a row once every row is taken; one more raises QueueFull.
    The engine owns the model's KV cache: nothing else may run the model (nor another engine) while it serves.
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, max_batch_size: int = 8,
                 max_seq_length: Optional[int] = None, max_queue: int = 64) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.max_seq_length = max_seq_length or model.config.block_size
        self.device = model.transformer.wte.weight.device
        ensure_kv_cache(model, batch_size=max_batch_size, max_seq_length=self.max_seq_length)
        self.waiting: Deque[Request] = deque()
        self.active: Dict[int, Request] = {}  # by cache row
        self.lock = threading.Condition()
        self.thread: Optional[threading.Thread] = None
        self.running = False

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams,
               listener: Optional[Callable[[Event], None]] = None) -> Request:
        """Queue a request; RequestError if it cannot fit the cache, QueueFull if too many wait already."""
        params.check()
        prompt_ids = [int(i) for i in prompt_ids]
        if not prompt_ids:
            raise RequestError("the prompt makes no token", "prompt")
        if len(prompt_ids) >= self.max_seq_length:
            raise RequestError(f"the prompt has {len(prompt_ids)} tokens; it must be shorter than the context length "
                               f"{self.max_seq_length}: shorten it", "messages")
        if params.max_tokens is not None and len(prompt_ids) + params.max_tokens > self.max_seq_length:
            raise RequestError(f"the prompt's {len(prompt_ids)} tokens plus max_tokens={params.max_tokens} exceed the "
                               f"context length {self.max_seq_length}: ask for at most "
                               f"{self.max_seq_length - len(prompt_ids)} tokens", "max_tokens")
        request = Request(prompt_ids, params, self.tokenizer, listener)
        with self.lock:
            if len(self.waiting) >= self.max_queue + self.max_batch_size - len(self.active):
                raise QueueFull(f"{len(self.active)} requests are running and {len(self.waiting)} waiting already: "
                                f"try again later")
            self.waiting.append(request)
            self.lock.notify()
        return request

    def num_active(self) -> int:
        with self.lock:
            return len(self.active)

    def num_waiting(self) -> int:
        with self.lock:
            return len(self.waiting)

    @torch.inference_mode()
    def step(self) -> None:
        """Admit waiting requests into free rows (one prefill each), then decode all active rows in one forward."""
        self.drop_cancelled()
        with self.lock:
            admitted = []
            free = [row for row in range(self.max_batch_size) if row not in self.active]
            while free and self.waiting:
                request = self.waiting.popleft()
                if request.cancelled.is_set():
                    request.finish("cancelled")
                    continue
                request.row = free.pop(0)
                self.active[request.row] = request
                admitted.append(request)
        for request in admitted:
            self.prefill(request)
        decoding = [r for r in self.active.values() if r.next_token is not None and r.finished is None]
        if decoding:
            self.decode(decoding)

    def prefill(self, request: Request) -> None:
        if request.params.seed is not None:
            request.generator = torch.Generator(self.device).manual_seed(request.params.seed)
        T = len(request.prompt_ids)
        idx = torch.tensor([request.prompt_ids], dtype=torch.long, device=self.device)
        input_pos = torch.arange(T, device=self.device).view(1, T)
        rows = torch.tensor([request.row], device=self.device)
        hidden = self.model.hidden_states(idx, input_pos, rows=rows)[:, -1]
        request.position = T
        self.take(request, self.sample(hidden, [request])[0])

    def decode(self, requests: List[Request]) -> None:
        """One forward of every decoding row: a (B, 1) token of each at its (B, 1) own position.

        The forward addresses the cache's first B rows when the decoding rows are nearly those (rows are handed out
        lowest first, so they mostly are): an idle row among them is fed a dummy token at position 0, which its next
        request's prefill overwrites before anything attends it. Otherwise it passes `rows=`, which gathers a copy of
        those rows' whole cache in every layer: B x 4.2 MB a step for the 135m shape with 57 slots, B x 150 MB with
        its 2048 (a forward of 16 rows of 57 slots on 2 CPU cores: 94 ms as the first rows, 121 ms through `rows=`).
        """
        requests = sorted(requests, key=lambda r: r.row)
        B = requests[-1].row + 1
        idle = [row for row in range(B) if row not in self.active]
        if len(idle) <= len(requests) // 2 and len(idle) + len(requests) == B:
            tokens, positions, rows = [0] * B, [0] * B, None
            for request in requests:
                tokens[request.row], positions[request.row] = request.next_token, request.position
            index = torch.tensor([r.row for r in requests], device=self.device)
        else:
            tokens, positions = [r.next_token for r in requests], [r.position for r in requests]
            rows = torch.tensor([r.row for r in requests], device=self.device)
            index = torch.arange(len(requests), device=self.device)
        idx = torch.tensor(tokens, dtype=torch.long, device=self.device).view(-1, 1)
        input_pos = torch.tensor(positions, dtype=torch.long, device=self.device).view(-1, 1)
        hidden = self.model.hidden_states(idx, input_pos, rows=rows)[index, -1]
        for request in requests:
            request.position += 1
        for request, token in zip(requests, self.sample(hidden, requests)):
            self.take(request, token)

    def sample(self, hidden: torch.Tensor, requests: List[Request]) -> List[int]:
        """The next token of each row of hidden (B, n_embd), sampled with each request's settings (one host sync)."""
        logits = self.model.lm_head(hidden)[:, : self.model.config.vocab_size]
        tokens = torch.argmax(logits, dim=-1)
        for i, request in enumerate(requests):
            p = request.params
            if p.temperature > 0:
                probs = logits_to_probs(logits[i], p.temperature, p.top_k, p.top_p)
                # the exponential race of generation.sample_probs, drawn from the request's own generator
                race = torch.empty_like(probs).exponential_(1, generator=request.generator)
                tokens[i] = torch.argmax(probs / race)
        return tokens.tolist()

    def take(self, request: Request, token: int) -> None:
        """Record a sampled token: stream its text and end the request if it stops there."""
        request.generated += 1
        params = request.params
        if token in params.stop_ids:
            self.end(request, "stop", flush=True)
            return
        if request.add_text(request.decoder.push(token)):
            self.end(request, "stop", flush=False)
            return
        budget_spent = params.max_tokens is not None and request.generated >= params.max_tokens
        if budget_spent or request.position + 1 > self.max_seq_length:
            self.end(request, "length", flush=True)
            return
        request.next_token = token

    def end(self, request: Request, reason: str, flush: bool) -> None:
        if flush and request.add_text(request.decoder.flush()):
            reason = "stop"
        elif flush:  # the held-back start of a stop string that never completed is text after all
            request.emit(request.text[request.sent:])
        with self.lock:
            self.active.pop(request.row, None)
        request.finish(reason)

    def drop_cancelled(self) -> None:
        with self.lock:
            cancelled = [r for r in self.active.values() if r.cancelled.is_set()]
            for request in cancelled:
                self.active.pop(request.row)
        for request in cancelled:
            request.finish("cancelled")

    def cancel_all(self) -> None:
        """Cancel every active and waiting request; they end at the engine's next step. It only sets flags (under
        the re-entrant lock, held briefly), so a signal handler may call it."""
        with self.lock:
            for request in [*self.active.values(), *self.waiting]:
                request.cancel()

    def fail_all(self, error: Exception) -> None:
        """End every active and waiting request with the error (the engine itself keeps running)."""
        with self.lock:
            requests = list(self.active.values()) + list(self.waiting)
            self.active.clear()
            self.waiting.clear()
        for request in requests:
            request.finish("error", f"{type(error).__name__}: {error}")

    def start(self) -> None:
        """Run steps in a daemon thread until `stop`; it sleeps while there is nothing to do."""
        self.running = True
        self.thread = threading.Thread(target=self.loop, name="serving-engine", daemon=True)
        self.thread.start()

    def loop(self) -> None:
        while True:
            with self.lock:
                while self.running and not self.active and not self.waiting:
                    self.lock.wait()
                if not self.running:
                    break
            try:
                self.step()
            except Exception as error:  # a failed step must not kill the server: its requests get the error
                self.fail_all(error)
        with self.lock:
            requests = list(self.active.values()) + list(self.waiting)
            self.active.clear()
            self.waiting.clear()
        for request in requests:
            request.finish("cancelled")

    def stop(self) -> None:
        """Cancel every request and end the background thread."""
        with self.lock:
            self.running = False
            self.lock.notify_all()
        if self.thread is not None:
            self.thread.join()
            self.thread = None
