"""serving.py's continuous batching in float64 (no near-tie can flip an argmax there), on the demo shape with random
weights, whose greedy text varies from token to token (the session's trained checkpoint soon repeats one token), and
the trained checkpoint's tokenizer (byte-fallback pieces included): batched greedy text equals each request alone
and generation.generate, rows are reused while others decode, stop strings are never emitted, seeds and
cancellation are per request."""

import copy

import pytest
import torch

from checkpoint import load_model
from generation import generate
from model import GPT
from serving import Engine, Finished, QueueFull, RequestError, SamplingParams
from tokenizer import StreamDecoder, Tokenizer

PROMPTS = ["def main():", "import os\n", "The", "class Reader:\n    def"]


@pytest.fixture(scope="module")
def loaded(trained):
    torch.manual_seed(0)
    model = GPT(load_model(trained.checkpoint_dir).config).double()
    return model, Tokenizer(trained.checkpoint_dir)


def run(engine: Engine, requests) -> None:
    """Step the engine until every request has finished."""
    while any(r.finished is None for r in requests):
        engine.step()


def test_concurrent_greedy_requests_equal_each_alone_and_generate(loaded):
    model, tokenizer = loaded
    reference_model = copy.deepcopy(model)  # generate resizes its model's cache
    budgets = [5, 23, 11, 40]
    expected = []
    for prompt, budget in zip(PROMPTS, budgets):
        ids = tokenizer.encode(prompt, bos=True)
        out = generate(reference_model, torch.tensor(ids), budget, temperature=0, stop_ids=[tokenizer.eos_id])
        new = out[len(ids):].tolist()
        expected.append(tokenizer.decode(new[:-1] if new[-1] == tokenizer.eos_id else new))

    def texts(engine):
        requests = [engine.submit(tokenizer.encode(p, bos=True),
                                  SamplingParams(max_tokens=b, temperature=0, stop_ids=[tokenizer.eos_id]))
                    for p, b in zip(PROMPTS, budgets)]
        run(engine, requests)
        return [r.result(timeout=0)[0] for r in requests]

    assert texts(Engine(model, tokenizer, max_batch_size=3)) == expected  # the 4th waits for a row
    assert texts(Engine(reference_model, tokenizer, max_batch_size=1)) == expected


def test_a_short_request_submitted_during_a_long_one_finishes_first(loaded):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, max_batch_size=2)
    long = engine.submit(tokenizer.encode(PROMPTS[0], bos=True), SamplingParams(max_tokens=40, temperature=0))
    for _ in range(5):
        engine.step()
    short = engine.submit(tokenizer.encode(PROMPTS[1], bos=True), SamplingParams(max_tokens=4, temperature=0))
    most_active = 0
    while short.finished is None:
        engine.step()
        most_active = max(most_active, engine.num_active())
    assert most_active == 2 and long.finished is None and short.finished.completion_tokens == 4
    run(engine, [long])
    assert long.finished == Finished("length", len(long.prompt_ids), 40) and engine.num_active() == 0


def test_a_stop_string_spanning_two_tokens_is_never_emitted(loaded):
    model, tokenizer = loaded
    ids = tokenizer.encode(PROMPTS[1], bos=True)
    engine = Engine(model, tokenizer, max_batch_size=2)
    full = engine.submit(ids, SamplingParams(max_tokens=30, temperature=0))
    run(engine, [full])
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push(t) for t in generate(model, torch.tensor(ids), 30, temperature=0)[len(ids):].tolist()]
    engine = Engine(model, tokenizer, max_batch_size=2)  # generate took the cache
    text = full.result(timeout=0)[0]
    assert text == "".join(pieces)
    k = next(k for k in range(3, len(pieces) - 1) if len(pieces[k].strip()) >= 2 and len(pieces[k + 1]) >= 2)
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    emitted = [""]  # the text emitted so far, after each piece: what a client has seen and cannot unsee

    def listener(event):
        if not isinstance(event, Finished):
            emitted.append(emitted[-1] + event)

    request = engine.submit(ids, SamplingParams(max_tokens=30, temperature=0, stop=["@@", stop]), listener)
    run(engine, [request])
    # the stop's first characters came with token k, its rest with token k + 1: they were held back, then dropped
    assert request.finished.reason == "stop" and emitted[-1] == text[: text.index(stop)]
    assert not any(stop in seen for seen in emitted)


def test_a_seeded_request_samples_the_same_text_alone_and_batched(loaded):
    model, tokenizer = loaded
    params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=7)
    engine = Engine(model, tokenizer, max_batch_size=3)
    alone = engine.submit(tokenizer.encode(PROMPTS[2], bos=True), params)
    run(engine, [alone])
    others = [engine.submit(tokenizer.encode(p, bos=True), SamplingParams(max_tokens=25, temperature=1.0))
              for p in PROMPTS[:2]]
    engine.step()
    batched = engine.submit(tokenizer.encode(PROMPTS[2], bos=True), params)
    run(engine, others + [batched])
    assert batched.result(timeout=0)[0] == alone.result(timeout=0)[0]


def test_cancel_frees_the_row_and_refusals_name_the_problem(loaded):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, max_batch_size=1, max_queue=0)
    engine.start()
    try:
        first = engine.submit(tokenizer.encode("The", bos=True), SamplingParams(max_tokens=200, temperature=0))
        first.events.get(timeout=30)  # it is decoding
        first.cancel()
        assert first.result(timeout=30)[1].reason == "cancelled"
        second = engine.submit(tokenizer.encode("The", bos=True), SamplingParams(max_tokens=3, temperature=0))
        assert second.result(timeout=30)[1].reason == "length" and engine.num_active() == 0
    finally:
        engine.stop()
    engine.submit([1, 2], SamplingParams(max_tokens=1))
    with pytest.raises(QueueFull):
        engine.submit([1, 2], SamplingParams(max_tokens=1))
    with pytest.raises(RequestError, match="max_tokens=300 exceed the context length 256"):
        engine.submit([1, 2], SamplingParams(max_tokens=300))
    with pytest.raises(RequestError, match="must be shorter than the context length 256"):
        engine.submit([1] * 256, SamplingParams())
