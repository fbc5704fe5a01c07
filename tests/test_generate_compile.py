"""Compiled decoding: the same tokens as eager in float64, and no recompilation for a second prompt of another length
(dynamo silently falls back to eager once a function passes its recompile limit: the failure to prevent)."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import generation
import speculative
from generation import generate
from model import GPT, Config


@pytest.fixture(autouse=True)
def fresh_dynamo(monkeypatch):
    torch._dynamo.reset()
    counters.clear()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only waits (10x slower on a busy machine)
    yield
    torch.set_num_threads(threads)
    torch._dynamo.reset()


def tiny_model(n_layer: int = 1, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = Config(block_size=64, vocab_size=48, padding_multiple=8, n_layer=n_layer, n_head=4, n_embd=32,
                    n_query_groups=2, intermediate_size=64)
    return GPT(config).double().eval()


def test_compiled_decode_step_matches_eager_without_recompiling():
    """One inductor compile (the slow part of this file): greedy and seeded sampling, two prompt lengths."""
    model = tiny_model()
    first, second = torch.randint(0, 48, (5,)), torch.randint(0, 48, (23,))
    eager = [generate(model, prompt, 12, temperature=0.0).tolist() for prompt in (first, second)]
    assert generate(model, first, 12, temperature=0.0, max_seq_length=64, compiled=True).tolist() == eager[0]
    assert counters["stats"]["unique_graphs"] == 1
    with torch.compiler.set_stance("fail_on_recompile"):
        assert generate(model, second, 12, temperature=0.0, max_seq_length=64, compiled=True).tolist() == eager[1]
    assert counters["stats"]["unique_graphs"] == 1


def test_compiled_speculative_steps_match_eager_without_recompiling(monkeypatch):
    """The draft step and the target's (k+1)-token verify, captured whole by dynamo (fullgraph) and run through
    aot_eager, which functionalises the in-place cache writes as inductor does; inductor itself is the test above."""
    def aot_eager_step(step, device):
        return compiled.setdefault(step, torch.compile(step, backend="aot_eager", fullgraph=True))

    compiled = {}
    monkeypatch.setattr(speculative, "compiled_step", aot_eager_step)
    target, draft = tiny_model(n_layer=2), tiny_model(n_layer=1, seed=1)
    batches = [[torch.randint(0, 48, (n,)) for n in lengths] for lengths in ((3, 9), (14, 6))]
    for i, prompts in enumerate(batches):
        with torch.compiler.set_stance("fail_on_recompile" if i == 1 else "default"):
            outputs = speculative.speculative_generate(target, draft, prompts, 15, speculative_k=3, temperature=0.0,
                                                       max_seq_length=48, compiled=True)
        expected = speculative.speculative_generate(target, draft, prompts, 15, speculative_k=3, temperature=0.0)
        assert [o.tolist() for o in outputs] == [e.tolist() for e in expected]
        assert [o.tolist() for o in outputs] == [generate(target, p, 15, temperature=0.0).tolist() for p in prompts]
    alone = speculative.speculative_generate(target, None, prompts, 15, temperature=0.0, max_seq_length=48,
                                             compiled=True)  # no draft: the target alone, through the same loop
    assert [o.tolist() for o in alone] == [generate(target, p, 15, temperature=0.0).tolist() for p in prompts]


def test_a_compiled_cpu_step_attends_the_cache_up_to_its_position_only():
    """generation.compiled_step's CPU step reads the cache's first max(input_pos) + 1 slots, one graph for every
    position: the slots past it hold NaN values here, which a step reading the whole cache turns into NaN logits (a
    zero weight times NaN)."""
    model = tiny_model()
    idx = torch.randint(0, 48, (1, 9))
    step = generation.compiled_step(generation.last_logits, torch.device("cpu"))
    with torch.inference_mode():
        model.set_kv_cache(batch_size=1, max_seq_length=64)
        expected = model(idx, torch.arange(9))[0, :, :48]
        model(idx[:, :5], torch.arange(5))
        for position in range(5, 9):
            model.transformer.h[0].attn.kv_cache.v[:, :, position + 1:] = float("nan")
            with torch.compiler.set_stance("fail_on_recompile" if position > 5 else "default"):
                logits = step(model, idx[:, position:position + 1], torch.tensor([position]))
            torch.testing.assert_close(logits[0], expected[position], rtol=1e-10, atol=1e-10)
    assert counters["stats"]["unique_graphs"] == 1
