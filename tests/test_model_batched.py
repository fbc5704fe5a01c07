"""model.py for batches whose rows differ: per-row positions, attention masks (and the layouts that build them),
KV-cache rows addressed by index, and rewinds.

References are independent of the batched path: Hugging Face's LlamaForCausalLM on a left-padded batch, and each
row (or packed document) run alone at batch size 1. Float64 throughout: `torch.equal` where the arithmetic is the
same, 1e-12 where only the shapes of the matmuls differ (a row alone and in a batch are ~1e-14 apart).
"""

import pytest
import torch

import torch.nn.functional as F

from hf import hf_config, hf_state_dict
from lm_eval_model import shared_context
from model import GPT, Config
from training import packed_documents

VOCAB = 200
TOL = dict(atol=1e-12, rtol=0)


def float64_model(n_query_groups: int = 2, seed: int = 0) -> GPT:
    """The micro config with large random weights, norms included, so that attention is far from uniform."""
    torch.manual_seed(seed)
    model = GPT(Config.from_name("micro", vocab_size=VOCAB, n_query_groups=n_query_groups)).double().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            is_norm = "norm" in name or "ln_f" in name
            param.copy_(1.0 + 0.2 * torch.randn_like(param) if is_norm else 0.2 * torch.randn_like(param))
    return model


def tokens(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def decode_alone(model: GPT, prompt: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """One row at batch size 1: prefill `prompt` (P,) into a fresh cache, then feed `new` (N,) one token at a time.
    Returns the (N + 1, vocab) logits of the prompt's last token and of each new one."""
    model.set_kv_cache(batch_size=1, max_seq_length=model.config.block_size)
    P = len(prompt)
    logits = [model(prompt[None], torch.arange(P))[0, -1:]]
    for i, token in enumerate(new):
        logits.append(model(token.view(1, 1), torch.tensor([P + i]))[0])
    return torch.cat(logits)


# ---------------------------------------------------------------------------------------------------- mask helpers


def test_packed_documents_positions_restart_and_mask_is_block_diagonal_causal():
    input_pos, mask = packed_documents(torch.tensor([[0, 0, 1, 1, 1, 2], [4, 4, 4, 4, 4, 4]]))
    assert input_pos.tolist() == [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]]
    assert mask.dtype == torch.bool and mask.shape == (2, 6, 6)
    expected = torch.zeros(6, 6, dtype=torch.bool)
    for start, end in [(0, 2), (2, 5), (5, 6)]:
        expected[start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril()
    assert torch.equal(mask[0], expected)
    assert torch.equal(mask[1], torch.ones(6, 6, dtype=torch.bool).tril())


# ---------------------------------------------------------------------------------------------------- against HF


def padding_mask(is_token: torch.Tensor, length: int) -> torch.Tensor:
    """attention_mask (B, 1, length) hiding the padding keys of is_token (B, T); the slots past T, which decoding
    fills later, are allowed (causality hides each until it is written)."""
    return F.pad(is_token, (0, length - is_token.size(-1)), value=True)[:, None, :]


def left_pad(rows: list, pad_id: int = 0):
    """(B, T) token ids with each row right-aligned, and is_token (B, T), False at the padding on the left."""
    T = max(len(row) for row in rows)
    idx = torch.full((len(rows), T), pad_id)
    is_token = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, row in enumerate(rows):
        idx[b, T - len(row):], is_token[b, T - len(row):] = row, True
    return idx, is_token


def test_left_padded_batch_matches_hf_with_attention_mask():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = float64_model()
    config = model.config
    hf = LlamaForCausalLM(LlamaConfig(**hf_config(config, "float64", None, None), attn_implementation="sdpa"))
    hf.load_state_dict(hf_state_dict(model.state_dict(), config))
    hf = hf.double().eval()
    prompt_lengths, n_new = [12, 7, 1], 5
    prompts, is_prompt = left_pad([tokens(n, seed=n) for n in prompt_lengths])
    idx = torch.cat([prompts, tokens(3, n_new)], dim=1)
    is_token = torch.cat([is_prompt, torch.ones(3, n_new, dtype=torch.bool)], dim=1)
    T0, T = prompts.size(1), idx.size(1)
    position_ids = (is_token.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(idx, attention_mask=is_token.long(), position_ids=position_ids).logits
        logits = model(idx, position_ids, padding_mask(is_token, T))
        # at the slot positions, as with a cache: each row's positions shifted by its padding
        slot_positions = model(idx, attention_mask=padding_mask(is_token, T))
        # with a cache: prefill the padded prompts, then decode one token at a time under the same mask
        model.set_kv_cache(batch_size=3, max_seq_length=T)
        mask = padding_mask(is_prompt, length=T)
        cached = torch.cat([model(prompts, torch.arange(T0), mask)]
                           + [model(idx[:, t : t + 1], torch.tensor([t]), mask) for t in range(T0, T)], dim=1)
    # float32's order: HF's RMSNorm computes in float32 even in a float64 model, and a shift of RoPE positions
    # (exact in arithmetic, RoPE being relative) is seen through the rounding of the float32 cos/sin tables
    torch.testing.assert_close(logits[is_token], expected[is_token], atol=1e-5, rtol=0)
    torch.testing.assert_close(slot_positions[is_token], logits[is_token], atol=1e-5, rtol=0)
    torch.testing.assert_close(cached[is_token], slot_positions[is_token], **TOL)
    assert cached.isfinite().all() and slot_positions.isfinite().all()  # padding queries attend themselves


# ---------------------------------------------------------------------------------------------------- KV cache rows


@pytest.mark.parametrize("n_query_groups", [4, 1])  # MHA, MQA (GQA in the other tests)
def test_per_row_positions_decode_each_row_as_if_alone(n_query_groups):
    """Right-padded prompts of different lengths: each row decodes from its own length; the padding it prefilled
    past that length sits at positions it has not reached, and is overwritten before it could be attended."""
    model = float64_model(n_query_groups)
    lengths, n_new = torch.tensor([5, 11, 8]), 6
    idx, new = tokens(3, 11), tokens(3, n_new, seed=2)
    with torch.no_grad():
        expected = [decode_alone(model, idx[b, :n], new[b]) for b, n in enumerate(lengths)]
        model.set_kv_cache(batch_size=3, max_seq_length=32)
        prefill = model(idx, torch.arange(11))
        logits = [prefill[torch.arange(3), lengths - 1]]
        for i in range(n_new):
            logits.append(model(new[:, i : i + 1], (lengths + i)[:, None])[:, 0])
        # an attention_mask that hides nothing changes nothing
        model(idx, torch.arange(11))
        everything = torch.ones(3, 1, 32, dtype=torch.bool)
        for i in range(n_new):
            assert torch.equal(model(new[:, i : i + 1], (lengths + i)[:, None], everything)[:, 0], logits[i + 1])
    logits = torch.stack(logits, dim=1)
    for b in range(3):
        torch.testing.assert_close(logits[b], expected[b], **TOL)


def test_rewind_ignores_what_was_written_past_the_position():
    """Speculative decoding: rows verify 3 draft tokens at their own positions, accept 0, 2 and 3 of them, and go on
    from there. Slots past each row's position (rejected drafts, or noise written there) change nothing."""
    model = float64_model()
    lengths, accepted = torch.tensor([6, 9, 4]), torch.tensor([0, 2, 3])
    prompts, drafts, after = tokens(3, 9), tokens(3, 3, seed=2), tokens(3, 2, seed=3)

    def run(noise: bool) -> torch.Tensor:
        model.set_kv_cache(batch_size=3, max_seq_length=24)
        model(prompts, torch.arange(9))
        model(drafts, lengths[:, None] + torch.arange(3))
        position = lengths + accepted
        if noise:
            past = (torch.arange(24) >= position[:, None])[:, None, :, None]  # (B, 1, S, 1)
            for block in model.transformer.h:
                for cache in block.attn.kv_cache.k, block.attn.kv_cache.v:
                    cache.copy_(torch.where(past, 100 * torch.randn_like(cache), cache))
        return model(after, position[:, None] + torch.arange(2))

    with torch.no_grad():
        logits = run(noise=False)
        assert torch.equal(run(noise=True), logits)  # masked slots contribute exact zeros
        model.clear_kv_cache()
        for b in range(3):
            kept = torch.cat([prompts[b, : lengths[b]], drafts[b, : accepted[b]], after[b]])
            torch.testing.assert_close(logits[b], model(kept[None])[0, -2:], **TOL)


def test_a_row_starts_a_new_sequence_while_the_others_keep_decoding():
    """Continuous batching: rows 0 and 2 of a 3-row cache decode requests A and B; A ends and request C is prefilled
    into row 0 at positions 0..n (B's row untouched), then C and B decode together at their own positions, in cache
    rows [0, 2]. Every logit equals that request's alone."""
    model = float64_model()
    a, b, c, new = tokens(7), tokens(5, seed=2), tokens(9, seed=3), tokens(2, 4, seed=4)
    rows = torch.tensor([0, 2])
    with torch.no_grad():
        expected_b = decode_alone(model, b, torch.cat([new[1, :2], new[1]]))
        expected_c = decode_alone(model, c, new[0])
        model.set_kv_cache(batch_size=3, max_seq_length=24)
        model(tokens(3, 24, seed=5), torch.arange(24))  # stale entries everywhere
        model(a[None], torch.arange(7), rows=torch.tensor([0]))
        b_logits = [model(b[None], torch.arange(5), rows=torch.tensor([2]))[0, -1:]]
        for i in range(2):  # A and B decode side by side
            step = model(torch.stack([a[:1], new[1, i : i + 1]]), torch.tensor([[7 + i], [5 + i]]), rows=rows)
            b_logits.append(step[1])
        c_logits = [model(c[None], torch.arange(9), rows=torch.tensor([0]))[0, -1:]]
        for i in range(4):
            step = model(torch.stack([new[0, i : i + 1], new[1, i : i + 1]]), torch.tensor([[9 + i], [7 + i]]),
                         rows=rows)
            c_logits.append(step[0])
            b_logits.append(step[1])
    torch.testing.assert_close(torch.cat(c_logits), expected_c, **TOL)
    torch.testing.assert_close(torch.cat(b_logits), expected_b, **TOL)


def test_kv_cache_row_errors():
    model = float64_model()
    with pytest.raises(ValueError, match=r"rows must be \(B,\) = \(1,\) KV cache rows.* without a cache"):
        model(tokens(1, 4), rows=torch.tensor([0]))
    model.set_kv_cache(batch_size=2, max_seq_length=16)
    with pytest.raises(ValueError, match=r"rows must be \(B,\) = \(2,\) KV cache rows, with input_pos and a cache, "
                                         r"got \(1,\)"):
        model(tokens(2, 4), torch.arange(4), rows=torch.tensor([0]))
    with pytest.raises(ValueError, match=r"3 rows, more than the KV cache's 2: call model.set_kv_cache\(3\)"):
        model(tokens(3, 4), torch.arange(4))


# ---------------------------------------------------------------------------------------------------- masks


def test_packed_documents_each_get_what_they_would_alone():
    model = float64_model()
    documents = [[5, 9, 3, 7], [10, 14]]  # lengths, two rows of 24 tokens
    idx = tokens(2, 24)
    document_ids = torch.tensor([[d for d, n in enumerate(row) for _ in range(n)] for row in documents])
    with torch.no_grad():
        logits = model(idx, *packed_documents(document_ids))
        for b, row in enumerate(documents):
            start = 0
            for n in row:
                alone = model(idx[b : b + 1, start : start + n])[0]
                torch.testing.assert_close(logits[b, start : start + n], alone, **TOL)
                start += n


def test_shared_context_gives_each_continuation_what_it_gets_after_the_context_alone():
    """Rows of a context and continuations of uneven lengths, right-padded into one batch: every continuation's
    logits (and the context's) equal those of context + that continuation run alone; padding changes nothing."""
    model = float64_model()
    rows = [(7, [3, 1, 5, 2]), (4, [6]), (9, [2, 2])]  # (context length, continuation lengths)
    length = max(c + sum(row) for c, row in rows) + 2
    idx = tokens(3, length)
    segment_ids = torch.full((3, length), -1)
    for b, (c, continuations) in enumerate(rows):
        segment_ids[b, :c] = 0
        start = c
        for segment, n in enumerate(continuations, start=1):
            segment_ids[b, start: start + n] = segment
            start += n
    with torch.no_grad():
        logits = model(idx, *shared_context(segment_ids))
        for b, (c, continuations) in enumerate(rows):
            start = c
            for n in continuations:
                alone = model(torch.cat([idx[b, :c], idx[b, start: start + n]])[None])[0]
                torch.testing.assert_close(logits[b, :c], alone[:c], **TOL)
                torch.testing.assert_close(logits[b, start: start + n], alone[c:], **TOL)
                start += n


def test_mask_of_all_true_equals_plain_causal_forward():
    model = float64_model()
    idx = tokens(2, 20)
    everything = torch.ones(2, 20, 20, dtype=torch.bool)
    with torch.no_grad():
        expected = model(idx)
        torch.testing.assert_close(model(idx, attention_mask=everything), expected, **TOL)
        torch.testing.assert_close(model(idx, torch.arange(20).expand(2, 20), everything[:, :1]), expected, **TOL)


def test_a_query_whose_keys_are_all_masked_attends_itself():
    """What keeps padding queries finite on every SDPA backend: each token alone, as a one-token sequence."""
    model = float64_model()
    idx = tokens(2, 7)
    with torch.no_grad():
        logits = model(idx, attention_mask=torch.zeros(2, 7, 7, dtype=torch.bool))
        torch.testing.assert_close(logits, model(idx.view(14, 1)).view(2, 7, -1), **TOL)


@pytest.mark.parametrize(
    "attention_mask",
    [
        torch.ones(2, 5, 5),  # not bool
        torch.ones(2, 5, dtype=torch.bool),  # key padding without its query dimension
        torch.ones(2, 5, 6, dtype=torch.bool),  # S != T without a cache
        torch.ones(3, 5, 5, dtype=torch.bool),  # B
    ],
)
def test_attention_mask_of_wrong_shape_or_dtype_raises(attention_mask):
    with pytest.raises(ValueError, match=r"attention_mask must be a bool tensor of shape \(2, 5, 5\) or \(2, 1, 5\)"):
        float64_model()(tokens(2, 5), attention_mask=attention_mask)


def test_packed_documents_needs_rows():
    with pytest.raises(ValueError, match="document_ids must be"):
        packed_documents(torch.zeros(5, dtype=torch.long))
