"""inheritune/attention_rank.py: k* and m* on matrices with known answers, the attention matrices against an explicit
softmax(QK^T / sqrt(d) + causal mask) written here and against Hugging Face's `output_attentions` (float64), the
lazy rule, the validation sequences it reads, and the command line end to end."""

import json
import math
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoint import load_model, save_model_dir
from hf import hf_config, hf_state_dict
from inheritune.attention_rank import (approximate_rank, attention_matrices, attention_rank, check_vocabulary,
                                       layer_attentions, layer_summary, mass_columns, mean_attention,
                                       validation_sequences)
from model import GPT, Config
from shard_format import PackedDatasetBuilder

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 256  # the micro config's


def random_model(n_query_groups: int = 2, seed: int = 0) -> GPT:
    """The micro config in float64 with large random weights (norms too), so that attention is far from uniform."""
    torch.manual_seed(seed)
    config = Config.from_name("micro", n_query_groups=n_query_groups)
    model = GPT(config).double()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(1.0 if param.dim() == 1 else 0.0, 0.3)  # 1-D: the norms' weights
    return model.eval()


def tokens(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def uniform_causal(T: int) -> torch.Tensor:
    """Row i attends tokens 0..i equally: what a head with q = 0 computes."""
    return torch.ones(T, T, dtype=torch.float64).tril() / torch.arange(1, T + 1, dtype=torch.float64)[:, None]


# ---------------------------------------------------------------------------------------------------- k* and m*


@pytest.mark.parametrize("T", [7, 10, 16])
def test_identity_needs_ceil_of_threshold_times_T_directions_and_columns(T):
    # T = 10 is a tie: 9 of 10 equal singular values and columns hold exactly 90%
    expected = -(-9 * T // 10)  # ceil(0.9 T) in integers
    assert approximate_rank(torch.eye(T), 0.9) == expected
    assert mass_columns(torch.eye(T), 0.9) == expected


@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.99, 1.0])
def test_all_mass_in_one_column_is_rank_one_and_one_column(threshold):
    sink = torch.zeros(12, 12)
    sink[:, 0] = 1.0  # every query attends the first token only
    assert approximate_rank(sink, threshold) == 1
    assert mass_columns(sink, threshold) == 1


def test_rank_counts_the_energy_of_known_singular_values():
    # energies 9, 4, 1, 0.25 of 14.25: shares 0.632, 0.912, 0.982, 1
    u, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    v, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    matrix = u[:, :4] @ torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64)) @ v[:, :4].T
    assert [approximate_rank(matrix, t) for t in (0.5, 0.63, 0.64, 0.9, 0.95, 0.99)] == [1, 1, 2, 2, 3, 4]


@pytest.mark.parametrize("T, threshold", [(16, 0.9), (40, 0.9), (40, 0.5)])
def test_uniform_causal_rows_mass_matches_the_harmonic_closed_form(T, threshold):
    # column j holds sum_{i >= j} 1/(i + 1) = H_T - H_j, largest first; the first m hold
    # m (H_T - H_{m-1}) + m - 1 (from sum_{j=1}^{n} H_j = (n + 1) H_n - n), out of T
    def H(n):
        return sum(Fraction(1, i) for i in range(1, n + 1))

    target = Fraction(threshold).limit_denominator(100) * T
    expected = next(m for m in range(1, T + 1) if m * (H(T) - H(m - 1)) + m - 1 >= target)
    assert mass_columns(uniform_causal(T), threshold) == expected


def test_uniform_causal_rows_rank_of_two_tokens_in_closed_form():
    # [[1, 0], [1/2, 1/2]]: A A^T = [[1, 1/2], [1/2, 1/2]] has eigenvalues (3 +- sqrt 5) / 4, so the first
    # direction holds (3 + sqrt 5) / 6 = 0.873 of the energy
    share = (3 + math.sqrt(5)) / 6
    assert approximate_rank(uniform_causal(2), share - 0.01) == 1
    assert approximate_rank(uniform_causal(2), share + 0.01) == 2


def test_uniform_causal_rows_rank_matches_numpy_singular_values():
    matrix = uniform_causal(48)
    energy = np.linalg.svd(matrix.numpy(), compute_uv=False) ** 2
    for threshold in (0.5, 0.9, 0.99):
        expected = next(r for r in range(1, 49) if energy[:r].sum() >= threshold * energy.sum())
        assert approximate_rank(matrix, threshold) == expected


def test_rank_and_mass_refuse_what_is_not_a_nonzero_matrix():
    with pytest.raises(ValueError, match="non-zero 2-D matrix"):
        approximate_rank(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="non-zero 2-D matrix"):
        mass_columns(torch.ones(2, 4, 4))


# ---------------------------------------------------------------------------------------------------- the lazy rule


def test_layer_is_lazy_only_when_every_head_is_within_both_limits():
    T = 8
    sink = torch.zeros(T, T)
    sink[:, 0] = 1.0  # k* = 1, m* = 1
    second = torch.zeros(T, T)
    second[0, 0], second[1:, 1] = 1.0, 1.0  # singular values sqrt(7), 1 and columns 7, 1: k* = m* = 2 at 0.9
    summary = layer_summary(torch.stack([sink, second, sink]), 0.9, lazy_rank=2, lazy_mass=2)
    assert summary["rank"] == [1, 2, 1] and summary["mass"] == [1, 2, 1]
    assert (summary["max_rank"], summary["mean_rank"], summary["min_rank"]) == (2, 4 / 3, 1)
    assert (summary["max_mass"], summary["mean_mass"], summary["min_mass"]) == (2, 4 / 3, 1)
    assert summary["lazy"]  # the limits are inclusive
    assert not layer_summary(torch.stack([sink, second]), 0.9, lazy_rank=1, lazy_mass=2)["lazy"]
    assert not layer_summary(torch.stack([sink, second]), 0.9, lazy_rank=2, lazy_mass=1)["lazy"]
    assert layer_summary(torch.stack([sink, second]), 0.85, lazy_rank=1, lazy_mass=1)["lazy"]  # 7/8 >= 0.85
    # one head that attends everywhere is enough to make the layer busy
    assert not layer_summary(torch.stack([sink, uniform_causal(T).float()]), 0.9, 2, 2)["lazy"]


def test_the_default_rule_is_the_papers_rank_one_and_the_mass_rule_is_stricter():
    """On attention matrices given directly: a head that puts half of each row on the first token and spreads the rest
    over its prefix is rank-1 at 0.9 (energy ~T/4 in the sink against ~ln(T)/4 spread) with a large m*: lazy by the
    default rule, not by the mass rule; a single column is lazy by both; a local (banded) pattern by neither."""
    T = 64
    rows = torch.arange(T)
    spread = torch.tril(torch.ones(T, T)) / (rows + 1)[:, None]  # each row uniform over its prefix
    half_sink = 0.5 * spread
    half_sink[:, 0] += 0.5
    single_column = torch.zeros(T, T)
    single_column[:, 0] = 1.0
    banded = torch.tril(torch.ones(T, T)) - torch.tril(torch.ones(T, T), diagonal=-3)  # itself and 2 before
    banded = banded / banded.sum(-1, keepdim=True)

    sink = layer_summary(half_sink[None], 0.9, lazy_rank=1)
    assert sink["rank"] == [1] and sink["mass"][0] >= T // 4 and sink["lazy"]  # m* 29 of 64
    assert not layer_summary(half_sink[None], 0.9, lazy_rank=1, lazy_mass=2)["lazy"]
    assert layer_summary(single_column[None], 0.9, lazy_rank=1)["lazy"]
    assert layer_summary(single_column[None], 0.9, lazy_rank=1, lazy_mass=2)["lazy"]
    local = layer_summary(banded[None], 0.9, lazy_rank=1)
    assert local["rank"][0] > 1 and not local["lazy"]
    assert not layer_summary(banded[None], 0.9, lazy_rank=1, lazy_mass=2)["lazy"]


# ---------------------------------------------------------------------------------------------------- attention


def explicit_attention(model: GPT, idx: torch.Tensor, layer: int) -> torch.Tensor:
    """(B, n_head, T, T) of one layer written out: RMSNorm, each head's q and k rows of the fused weight, RoPE from
    its angles in float64, softmax(q k^T / sqrt(d) + causal mask) by exp and sum. The layer's input is the model's."""
    cfg = model.config
    T, hs = idx.size(1), cfg.head_size
    with torch.no_grad():
        x = model.transformer.wte(idx)
        for block in model.transformer.h[:layer]:
            x = block(x, model.cos[:T], model.sin[:T])
        block = model.transformer.h[layer]
        h = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * block.norm_1.weight
        weight = block.attn.qkv.weight
        inv_freq = cfg.rope_base ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)
        angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq
        cos, sin = angles.cos(), angles.sin()

        def rope(v):  # rotate-half: channel pairs (i, i + hs/2)
            a, b = v[..., : hs // 2], v[..., hs // 2 :]
            return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

        mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
        heads = []
        for head in range(cfg.n_head):
            group = head // (cfg.n_head // cfg.n_query_groups)
            k_row = cfg.n_head * hs + group * hs
            q = rope(h @ weight[head * hs : (head + 1) * hs].T)
            k = rope(h @ weight[k_row : k_row + hs].T)
            scores = q @ k.transpose(-1, -2) / math.sqrt(hs) + mask
            e = (scores - scores.amax(-1, keepdim=True)).exp()
            heads.append(e / e.sum(-1, keepdim=True))
    return torch.stack(heads, dim=1)


@pytest.mark.parametrize("n_query_groups", [4, 2, 1])  # MHA, GQA, MQA
def test_attention_matches_explicit_softmax_of_scaled_qk_with_causal_mask(n_query_groups):
    model = random_model(n_query_groups)
    idx = tokens(3, 20)
    attentions = list(layer_attentions(model, idx))
    assert len(attentions) == model.config.n_layer
    for layer, attention in enumerate(attentions):
        assert attention.dtype == torch.float64 and attention.shape == (3, 4, 20, 20)
        # the model's cos/sin tables are float32, the reference's angles float64: ~4e-7 apart
        torch.testing.assert_close(attention, explicit_attention(model, idx, layer), atol=2e-6, rtol=0)
    assert torch.equal(attention_matrices(model, idx), torch.stack([a.mean(0) for a in attentions]))


@pytest.mark.parametrize("n_query_groups", [4, 2])  # MHA, GQA
def test_attention_matches_hf_output_attentions(n_query_groups):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = random_model(n_query_groups)
    config = LlamaConfig(**hf_config(model.config, "float64", None, None), attn_implementation="eager")
    hf = LlamaForCausalLM(config).double().eval()  # float64 before loading: the weights are not rounded to float32
    hf.load_state_dict(hf_state_dict(model.state_dict(), model.config))
    idx = tokens(3, 24)
    with torch.no_grad():
        expected = hf(idx, output_attentions=True).attentions
    # HF's eager attention takes its softmax, and its RMSNorm, in float32 even in a float64 model: ~2e-6 apart
    # (a wrong K group per head is ~1 apart)
    for attention, hf_attention in zip(layer_attentions(model, idx), expected, strict=True):
        torch.testing.assert_close(attention, hf_attention, atol=1e-5, rtol=0)
    torch.testing.assert_close(attention_matrices(model, idx), torch.stack(expected).mean(1), atol=1e-5, rtol=0)


def test_average_over_batches_equals_average_over_all_sequences_at_once():
    model = random_model()
    sequences = tokens(7, 16)
    torch.testing.assert_close(mean_attention(model, sequences, batch_size=3), attention_matrices(model, sequences),
                               atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------------- data


def write_validation_shards(directory: Path, n_tokens: int = 350, chunk_size: int = 100, seed: int = 0) -> list:
    """validation_* shards of random tokens; returns each file's tokens."""
    stream = np.random.default_rng(seed).integers(0, VOCAB, n_tokens)
    builder = PackedDatasetBuilder(directory, "validation_test", chunk_size=chunk_size, vocab_size=VOCAB)
    builder.add_array(stream)
    builder.finish()
    return [stream[start : start + chunk_size] for start in range(0, n_tokens, chunk_size)]


@pytest.mark.parametrize("layout", ["flat", "validation_subdirectory"])
def test_sequences_are_the_first_blocks_of_the_validation_shards_in_order(tmp_path, layout):
    shards = tmp_path / "data" / ("validation" if layout == "validation_subdirectory" else "")
    files = write_validation_shards(shards)
    (tmp_path / "data" / "train_test_0000000000.bin").write_bytes(b"not read")
    # each 100-token file holds 6 blocks of 16 tokens from its start; its last 4 tokens are never read
    expected = [chunk[b * 16 : (b + 1) * 16] for chunk in files for b in range(len(chunk) // 16)]
    sequences = validation_sequences(tmp_path / "data", num_sequences=20, seq_len=16)
    assert sequences.dtype == torch.int64
    assert sequences.tolist() == [block.tolist() for block in expected[:20]]


def test_too_few_blocks_missing_shards_and_foreign_vocabulary_are_refused(tmp_path):
    write_validation_shards(tmp_path)
    with pytest.raises(ValueError, match="--num_sequences 22: .* hold only 21 blocks of 16 tokens"):
        validation_sequences(tmp_path, num_sequences=22, seq_len=16)
    with pytest.raises(FileNotFoundError, match="No data files"):
        validation_sequences(tmp_path / "elsewhere", num_sequences=1, seq_len=16)
    with pytest.raises(ValueError, match=r"token id 250, outside the vocabulary \[0, 199\] of .*: tokenize"):
        check_vocabulary(torch.tensor([[3, 250, 7]]), 200, tmp_path, tmp_path / "checkpoint")


# ---------------------------------------------------------------------------------------------------- end to end


def save_micro_checkpoint(directory: Path) -> None:
    model = random_model().float()
    save_model_dir(model, model.config, None, directory)


@pytest.mark.parametrize("arguments, message", [
    (dict(seq_len=65), r"--seq_len 65 exceeds the block_size 64 of .*: choose --seq_len <= 64"),
    (dict(plot_layers=[1, 2]), r"--plot_layers \[2\]: .* has 2 layers, numbered 0 to 1"),
    (dict(threshold=0.0), r"--threshold must be in \(0, 1\]"),
    (dict(batch_size=0), "--batch_size must be at least 1"),
])
def test_arguments_out_of_range_are_refused_with_the_fix(tmp_path, arguments, message):
    save_micro_checkpoint(tmp_path / "checkpoint")
    write_validation_shards(tmp_path / "data")
    with pytest.raises(ValueError, match=message):
        attention_rank(tmp_path / "checkpoint", tmp_path / "data", **{"num_sequences": 2, "seq_len": 16, **arguments})


def test_command_line_writes_the_json_and_the_plots(tmp_path):
    save_micro_checkpoint(tmp_path / "checkpoint")
    files = write_validation_shards(tmp_path / "data" / "validation", n_tokens=100)
    out = tmp_path / "rank"
    command = [sys.executable, str(ROOT / "inheritune/attention_rank.py"), "--checkpoint_dir",
               str(tmp_path / "checkpoint"), "--data_dir", str(tmp_path / "data"), "--num_sequences", "5",
               "--seq_len", "16", "--batch_size", "2", "--plot_layers", "1", "--device", "cpu", "--out_dir", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Lazy layers" in result.stdout

    report = json.loads((out / "attention_rank.json").read_text())
    assert (report["n_layer"], report["n_head"], report["num_sequences"], report["seq_len"]) == (2, 4, 5, 16)
    # the same five blocks, averaged in one batch by a float64 copy of the checkpoint
    reference = load_model(tmp_path / "checkpoint", dtype=torch.float64)
    blocks = torch.from_numpy(np.stack([files[0][b * 16 : (b + 1) * 16] for b in range(5)]))
    expected = [layer_summary(heads, 0.9, 1) for heads in attention_matrices(reference, blocks)]  # the defaults
    assert [{k: v for k, v in layer.items() if k != "layer"} for layer in report["layers"]] == expected
    assert report["lazy_layers"] == [i for i, layer in enumerate(expected) if layer["lazy"]]
    assert report["plots"] == ["attention_rank.png", "attention_mass.png", "attention_layer1.png"]
    for name in report["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
