"""model.py against hand-written references: parameter counts, init, Config, attention, RoPE, KV cache."""

import json
import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

import model as model_module
from model import GPT, CausalSelfAttention, Config, apply_rope, build_rope_cache, num_parameters
from utils import write_json


def meta_model(config: Config) -> GPT:
    with torch.device("meta"):
        return GPT(config)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("tiny_LLaMA_1b", 1_100_048_384),  # TinyLlama-1.1B
        ("code_tiny_LLaMA_1b", 1_100_048_384),  # same weights, longer context
        ("AMD-Llama-135m", 134_105_856),
        ("Llama-2-7b-hf", 6_738_415_616),  # Hugging Face's count for meta-llama/Llama-2-7b-hf
        ("open_llama_3b", 3_426_473_600),  # openlm-research/open_llama_3b
        ("CodeLlama-7b-hf", 6_738_546_688),  # codellama/CodeLlama-7b-hf (vocab 32016)
    ],
)
def test_parameter_count(name, expected):
    assert num_parameters(meta_model(Config.from_name(name))) == expected


def test_parameter_count_formula_for_every_config():
    for name in Config.names():
        c = Config.from_name(name)
        q, kv = c.n_head * c.head_size, c.n_query_groups * c.head_size
        per_layer = 2 * c.n_embd + c.n_embd * (q + 2 * kv) + q * c.n_embd + 3 * c.n_embd * c.intermediate_size
        expected = 2 * c.padded_vocab_size * c.n_embd + c.n_layer * per_layer + c.n_embd
        assert num_parameters(meta_model(c)) == expected, name


# ---------------------------------------------------------------------------------------------------- init


INIT_CONFIG = dict(block_size=32, vocab_size=512, n_layer=3, n_head=4, n_embd=256, n_query_groups=2,
                   intermediate_size=512)


def assert_normal(tensor: torch.Tensor, std: float, name: str) -> None:
    """Mean and std of iid N(0, std) samples, within 6 standard errors."""
    x = tensor.detach().double().flatten()
    n = x.numel()
    assert abs(x.mean().item()) < 6 * std / math.sqrt(n), name
    assert abs(x.std().item() / std - 1) < 6 / math.sqrt(2 * n), (name, x.std().item(), std)


def check_init(model: GPT) -> None:
    c = model.config
    std = math.sqrt(2 / (5 * c.n_embd))
    out_std = 1 / (math.sqrt(c.n_embd) * c.n_layer)
    groups = {"std": [], "out_std": [], "norm": []}
    for name, p in model.named_parameters():
        if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
            assert_normal(p, out_std, name)
            groups["out_std"].append(p.flatten())
        elif "norm" in name or name.startswith("transformer.ln_f"):
            assert torch.equal(p, torch.ones_like(p)), name
            groups["norm"].append(p)
        elif name.endswith(".bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:
            assert name.endswith(("wte.weight", "lm_head.weight", "qkv.weight", "fc_1.weight", "fc_2.weight")), name
            assert_normal(p, std, name)
            groups["std"].append(p.flatten())
    assert_normal(torch.cat(groups["std"]), std, "embeddings and linear layers")
    assert_normal(torch.cat(groups["out_std"]), out_std, "residual output projections")
    assert len(groups["norm"]) == 2 * c.n_layer + 1
    assert len(groups["out_std"]) == 2 * c.n_layer


@pytest.mark.parametrize("bias", [False, True])
def test_init_statistics(bias):
    torch.manual_seed(0)
    check_init(GPT(Config(**INIT_CONFIG, bias=bias)))


def test_meta_init_matches_normal_init():
    config = Config(**INIT_CONFIG, rope_condense_ratio=2)
    model = meta_model(config)
    assert model.lm_head.weight.is_meta
    model.to_empty(device="cpu")
    torch.manual_seed(1)
    model.reset_parameters()
    check_init(model)
    reference = GPT(config)
    assert torch.equal(model.cos, reference.cos) and torch.equal(model.sin, reference.sin)
    cos, sin = reference_rope_cache(config, config.block_size)
    torch.testing.assert_close(model.cos, cos.float())
    torch.testing.assert_close(model.sin, sin.float())
    # with the same seed, reset_parameters draws the same weights on either model
    torch.manual_seed(1)
    reference.reset_parameters()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name



def test_a_tied_model_has_one_parameter_for_embedding_and_head_also_after_to_empty():
    config = Config.from_name("micro", tie_embeddings=True)
    model = meta_model(config)
    model.to_empty(device="cpu")  # makes two tensors of the shared one
    model.reset_parameters()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert num_parameters(model) == num_parameters(GPT(Config.from_name("micro"))) - model.lm_head.weight.numel()
    idx = torch.randint(0, config.vocab_size, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), model.hidden_states(idx) @ model.transformer.wte.weight.T)


# ---------------------------------------------------------------------------------------------------- Config


def test_config_from_name_with_overrides():
    c = Config.from_name("micro", n_layer=3, vocab_size=100)
    assert (c.name, c.n_layer, c.vocab_size, c.padded_vocab_size) == ("micro", 3, 100, 128)
    assert (c.n_embd, c.n_head, c.n_query_groups, c.head_size) == (64, 4, 2, 16)
    assert Config.from_name("micro").n_layer == 2  # overrides do not leak into the table
    assert Config.from_name("CodeLlama-7b-hf").padded_vocab_size == 32016


def test_config_unknown_name_lists_names():
    with pytest.raises(ValueError, match="tiny_LLaMA_9b") as info:
        Config.from_name("tiny_LLaMA_9b")
    for name in model_module.configs:
        assert name in str(info.value)


def test_config_names_lists_all():
    assert Config.names() == sorted(model_module.configs)
    assert {"tiny_LLaMA_1b", "AMD-Llama-135m", "micro", "demo"} <= set(Config.names())
    for name in Config.names():
        assert Config.from_name(name).name == name


def test_config_file_round_trip(tmp_path):
    config = Config.from_name("demo", rope_condense_ratio=4)
    write_json(tmp_path / "model_config.json", asdict(config))
    assert Config.from_file(tmp_path) == config
    assert Config.from_file(tmp_path / "model_config.json") == config
    assert Config.from_file(tmp_path, n_layer=7).n_layer == 7
    write_json(tmp_path / "other.json", asdict(config))
    assert Config.from_file(tmp_path / "other.json") == config


def test_config_files_written_with_rotary_percentage_load_when_it_is_one(tmp_path):
    """Every model_config.json written before the field went holds rotary_percentage 1.0 (save_model_dir at
    5c828bd wrote asdict(config)); other values, which no named config had, are refused by name."""
    written = json.loads(  # out/demo/final/model_config.json as save_model_dir wrote it at 5c828bd
        '{"name": "demo", "block_size": 256, "vocab_size": 4096, "padding_multiple": 64, "padded_vocab_size": 4096, '
        '"n_layer": 4, "n_head": 4, "n_embd": 256, "n_query_groups": 2, "head_size": 64, "rotary_percentage": 1.0, '
        '"rope_base": 10000, "rope_condense_ratio": 1, "intermediate_size": 704, "norm_eps": 1e-05, "bias": false}')
    (tmp_path / "model_config.json").write_text(json.dumps(written))
    assert Config.from_file(tmp_path) == Config.from_name("demo")
    (tmp_path / "model_config.json").write_text(json.dumps({**written, "rotary_percentage": 0.5}))
    with pytest.raises(ValueError, match=r"model_config.json: rotary_percentage=0.5; this model applies RoPE to every"):
        Config.from_file(tmp_path)


def test_config_file_unknown_key(tmp_path):
    path = tmp_path / "model_config.json"
    path.write_text(json.dumps({**model_module.configs["micro"], "n_layers": 3}))
    with pytest.raises(ValueError, match="n_layers") as info:
        Config.from_file(path)
    assert str(path) in str(info.value)


def test_config_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_config.json"):
        Config.from_file(tmp_path)


# -------------------------------------------------------------------------------------------- RoPE and attention


def reference_rope_cache(config: Config, T: int):
    """cos and sin in float64 from the formula: angle(pos, i) = pos / condense_ratio * base^(-2i / head_size)."""
    n = config.head_size
    pos = torch.arange(T, dtype=torch.float64)[:, None] / config.rope_condense_ratio
    i = torch.arange(n // 2, dtype=torch.float64)[None, :]
    angle = pos * config.rope_base ** (-2 * i / n)
    angle = torch.cat([angle, angle], dim=1)
    return angle.cos(), angle.sin()


def reference_rope(x: torch.Tensor, config: Config) -> torch.Tensor:
    """Rotate-half on each head's channels: (B, T, H, hs)."""
    n = config.head_size
    cos, sin = reference_rope_cache(config, x.size(1))
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x = x.double()
    x1, x2 = x[..., : n // 2], x[..., n // 2 :]
    return torch.cat([x1 * cos[..., : n // 2] - x2 * sin[..., : n // 2],
                      x2 * cos[..., n // 2 :] + x1 * sin[..., n // 2 :]], dim=-1).float()


@pytest.mark.parametrize("condense", [1, 4])
def test_rope_matches_reference(condense):
    config = Config.from_name("micro", rope_condense_ratio=condense)
    T = config.block_size
    x = torch.randn(2, T, config.n_head, config.head_size)
    cos, sin = build_rope_cache(config)
    assert cos.shape == (T, config.head_size)
    torch.testing.assert_close(apply_rope(x, cos, sin), reference_rope(x, config))


def test_rope_per_row_positions_rotate_each_row_at_its_own():
    config = Config.from_name("micro")
    x = torch.randn(3, 10, config.n_head, config.head_size)
    positions = torch.randint(0, config.block_size, (3, 10))
    cos, sin = build_rope_cache(config)
    out = apply_rope(x, cos[positions], sin[positions])
    for b in range(3):
        row = apply_rope(x[b : b + 1], cos[positions[b]], sin[positions[b]], )
        assert torch.equal(out[b : b + 1], row)


def test_rope_condense_ratio_divides_positions():
    plain = Config.from_name("micro", block_size=64)
    condensed = Config.from_name("micro", block_size=64, rope_condense_ratio=4)
    cos, sin = build_rope_cache(plain)
    cos4, sin4 = build_rope_cache(condensed)
    torch.testing.assert_close(cos4[::4], cos[:16])
    torch.testing.assert_close(sin4[::4], sin[:16])
    assert not torch.allclose(cos4[1:16], cos[1:16])


def reference_attention(attn: CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """Llama attention written out: separate q/k/v, RoPE, K/V repeated per query group, softmax with a causal mask."""
    c = attn.config
    B, T, _ = x.shape
    q_size, kv_size = c.n_head * c.head_size, c.n_query_groups * c.head_size
    w_q, w_k, w_v = attn.qkv.weight.split([q_size, kv_size, kv_size])
    q = reference_rope((x @ w_q.T).view(B, T, c.n_head, c.head_size), c).transpose(1, 2)
    k = reference_rope((x @ w_k.T).view(B, T, c.n_query_groups, c.head_size), c).transpose(1, 2)
    v = (x @ w_v.T).view(B, T, c.n_query_groups, c.head_size).transpose(1, 2)
    heads_per_group = c.n_head // c.n_query_groups
    k = k.repeat_interleave(heads_per_group, dim=1)  # query head h uses K/V group h // heads_per_group
    v = v.repeat_interleave(heads_per_group, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(c.head_size)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    y = torch.softmax(scores, dim=-1) @ v
    return y.transpose(1, 2).reshape(B, T, q_size) @ attn.proj.weight.T


@pytest.mark.parametrize("n_query_groups", [4, 2, 1])  # MHA, GQA, MQA
def test_attention_matches_reference(n_query_groups):
    torch.manual_seed(0)
    config = Config.from_name("micro", n_query_groups=n_query_groups)
    attn = CausalSelfAttention(config)
    torch.nn.init.normal_(attn.qkv.weight, std=0.3)  # large enough that attention is far from uniform
    x = torch.randn(2, 24, config.n_embd)
    cos, sin = build_rope_cache(config)
    with torch.no_grad():
        out = attn(x, cos[:24], sin[:24])
        torch.testing.assert_close(out, reference_attention(attn, x), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------- KV cache


def micro_model(n_query_groups: int, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(Config.from_name("micro", vocab_size=200, n_query_groups=n_query_groups)).eval()


def cached_logits(model: GPT, idx: torch.Tensor, n_prefill: int) -> torch.Tensor:
    """Prefill `n_prefill` tokens in one forward, then feed the rest one at a time through the KV cache."""
    logits = [model(idx[:, :n_prefill], torch.arange(n_prefill))]
    for t in range(n_prefill, idx.size(1)):
        logits.append(model(idx[:, t : t + 1], torch.tensor([t])))
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("n_query_groups", [4, 2, 1])  # MHA, GQA, MQA
def test_kv_cache_matches_full_forward(n_query_groups):
    model = micro_model(n_query_groups)
    idx = torch.randint(0, 200, (2, 40))
    with torch.no_grad():
        expected = model(idx)
        model.set_kv_cache(batch_size=2, max_seq_length=48)
        torch.testing.assert_close(cached_logits(model, idx, n_prefill=7), expected, atol=1e-5, rtol=1e-5)
        # reuse, with a different prefill split: what the cache holds is overwritten before it is attended
        torch.testing.assert_close(cached_logits(model, idx, n_prefill=1), expected, atol=1e-5, rtol=1e-5)
        # stale entries beyond the new prompt are masked: a shorter sequence without reset gives its own logits
        torch.testing.assert_close(cached_logits(model, idx[:, :10], n_prefill=3), expected[:, :10], atol=1e-5,
                                   rtol=1e-5)


def test_on_the_cpu_a_cached_forward_attends_the_slots_up_to_its_last_position(monkeypatch):
    """On the CPU the attention reads the cache's first max(input_pos) + 1 slots, not all of them (the
    others are masked for every query), per row of the batch as well: the logits are those of the whole cache's."""
    attended = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, **kwargs):
        attended.append(k.size(2))
        return sdpa(q, k, v, **kwargs)

    model = micro_model(2).double()
    idx = torch.randint(0, 200, (2, 12))
    with torch.no_grad():
        model.set_kv_cache(batch_size=2, max_seq_length=48)
        # rows at different positions (written again with the same values: the cache ends as it was); the window is
        # the furthest row's
        rows, positions = torch.tensor([1, 0]), torch.tensor([[3, 4], [10, 11]])
        # the whole cache, as a compile that does not capture the position as a size reads it
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        whole = cached_logits(model, idx, n_prefill=9)
        whole_rows = model(idx[:, :2], positions, rows=rows)
        monkeypatch.undo()
        monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
        windowed = cached_logits(model, idx, n_prefill=9)
        windowed_rows = model(idx[:, :2], positions, rows=rows)
    layers = model.config.n_layer
    assert attended == [9] * layers + [10] * layers + [11] * layers + [12] * layers + [12] * layers
    torch.testing.assert_close(windowed, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(windowed_rows, whole_rows, rtol=1e-12, atol=1e-12)


def test_kv_cache_full_block_size():
    model = micro_model(2)
    T = model.config.block_size
    idx = torch.randint(0, 200, (1, T))
    with torch.no_grad():
        model.set_kv_cache(batch_size=1)
        assert model.transformer.h[0].attn.kv_cache.k.shape == (1, 2, T, 16)
        torch.testing.assert_close(cached_logits(model, idx, n_prefill=T - 2), model(idx), atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="block_size"):
            model.set_kv_cache(batch_size=1, max_seq_length=T + 1)


def test_clear_kv_cache_then_input_pos_raises():
    model = micro_model(2)
    model.set_kv_cache(batch_size=1, max_seq_length=16)
    model.clear_kv_cache()
    assert all(block.attn.kv_cache is None for block in model.transformer.h)
    with pytest.raises(RuntimeError, match="set_kv_cache"):
        model(torch.zeros(1, 3, dtype=torch.long), torch.arange(3))
    model(torch.zeros(1, 3, dtype=torch.long))  # a plain forward still works


def test_forward_longer_than_block_size_raises():
    model = micro_model(2)
    T = model.config.block_size
    assert model(torch.zeros(1, T, dtype=torch.long)).shape == (1, T, model.config.padded_vocab_size)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, T + 1, dtype=torch.long))


def test_forward_is_causal():
    model = micro_model(2)
    idx = torch.randint(0, 200, (1, 20))
    changed = idx.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % 200
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[:, :12], model(changed)[:, :12])
        assert not torch.allclose(model(idx)[:, 12:], model(changed)[:, 12:])


def test_rmsnorm_matches_reference():
    norm = model_module.RMSNorm(64, eps=1e-5)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    x64 = x.double()
    expected = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected.to(torch.bfloat16).double())


def test_rmsnorm_keeps_float64_in_float64():
    norm = model_module.RMSNorm(64, eps=1e-5).double()
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 5, 64, dtype=torch.float64)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    out = norm(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, atol=1e-14, rtol=1e-14)  # fp32 would be off by ~1e-7


def test_mlp_matches_reference():
    config = Config.from_name("micro")
    mlp = model_module.LLaMAMLP(config)
    x = torch.randn(2, 5, config.n_embd)
    expected = (F.silu(x @ mlp.fc_1.weight.T) * (x @ mlp.fc_2.weight.T)) @ mlp.proj.weight.T
    torch.testing.assert_close(mlp(x), expected)


@pytest.mark.parametrize("heads, groups", [(8, 2), (4, 4)])
def test_one_query_attention_is_sdpa_for_a_decode_step(heads, groups, monkeypatch):
    """bf16 decode steps on the CPU take one_query_attention instead of SDPA: the same attention (float64 SDPA on the
    same bf16 inputs as the reference), eager (matmuls, over a whole cache and over the window of a longer one) and
    compiled (products and sums), for per-row masks (rows at different positions) and for one shared mask; and a bf16
    model's cached one-token step reaches it, giving the float64 model's logits within bf16's precision."""
    torch.manual_seed(0)
    B, S, hs = 3, 40, 16
    q = torch.randn(B, heads, 1, hs).bfloat16()
    k, v = torch.randn(B, groups, S, hs).bfloat16(), torch.randn(B, groups, S, hs).bfloat16()
    cache = torch.randn(2, B, groups, S + 8, hs).bfloat16()
    cache[..., :S, :] = torch.stack([k, v])  # the same keys and values as the window of a longer cache
    window = cache.narrow(-2, 0, S)
    positions = torch.tensor([5, 17, 39])
    torch._dynamo.reset()
    compiled = torch.compile(model_module.one_query_attention, fullgraph=True, dynamic=False)
    for mask in ((torch.arange(S) <= positions[:, None]).view(B, 1, 1, S), (torch.arange(S) <= 9).view(1, 1, 1, S)):
        expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=0.25,
                                                  enable_gqa=heads != groups)
        for attention, keys, values in ((model_module.one_query_attention, k, v),
                                        (model_module.one_query_attention, *window), (compiled, k, v)):
            got = attention(q, keys, values, mask, 0.25)
            assert got.dtype == torch.bfloat16
            torch.testing.assert_close(got.double(), expected, rtol=2e-2, atol=2e-2)
    torch._dynamo.reset()

    config = Config(block_size=64, vocab_size=64, n_layer=2, n_head=heads, n_query_groups=groups, n_embd=heads * hs,
                    intermediate_size=64)
    reference = GPT(config).double().eval()
    bf16 = GPT(config).bfloat16().eval()
    bf16.load_state_dict(reference.state_dict())
    calls = []
    original = model_module.one_query_attention
    monkeypatch.setattr(model_module, "one_query_attention", lambda *args: calls.append(1) or original(*args))
    idx = torch.randint(0, 64, (1, 12))
    with torch.inference_mode():
        logits = {}
        for name, model in (("float64", reference), ("bf16", bf16)):
            model.set_kv_cache(batch_size=1, max_seq_length=64)
            model(idx[:, :11], torch.arange(11))
            logits[name] = model(idx[:, 11:], torch.tensor([11])).double()
    assert len(calls) == config.n_layer  # the bf16 step only
    torch.testing.assert_close(logits["bf16"], logits["float64"], rtol=5e-2, atol=5e-2)
