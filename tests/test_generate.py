"""generation.py and its command line generate/base.py: KV-cache decoding against full forward passes, sampling
against hand-computed distributions, and the command line end to end on a checkpoint and sentencepiece tokenizer made
in the test."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generate.base as generate_base
from checkpoint import save_model_dir
from generation import compiled_cache_length, generate, logits_to_probs, sample
from model import GPT, Config
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent


def micro_model(n_query_groups: int = 2, vocab_size: int = 200, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(Config.from_name("micro", vocab_size=vocab_size, n_query_groups=n_query_groups)).eval()


@torch.no_grad()
def greedy_reference(model: GPT, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Argmax over the real vocabulary of a full forward pass (no KV cache) over the growing sequence."""
    idx = prompt.long()
    for _ in range(max_new_tokens):
        logits = model(idx[None])[0, -1, : model.config.vocab_size]
        idx = torch.cat([idx, logits.argmax()[None]])
    return idx


# ---------------------------------------------------------------------------------------------------- generate


@pytest.mark.parametrize("n_query_groups", [4, 2, 1])  # MHA, GQA, MQA
def test_greedy_with_kv_cache_matches_full_forward(n_query_groups):
    model = micro_model(n_query_groups)
    prompt = torch.randint(0, 200, (6,))
    expected = greedy_reference(model, prompt, 30)
    output = generate(model, prompt, 30, temperature=0.0)
    assert output.dtype == torch.long and output.shape == (36,)
    assert output.tolist() == expected.tolist()
    assert len(set(output[6:].tolist())) > 3  # a real sequence, not one token repeated


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_greedy_with_kv_cache_matches_full_forward_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = micro_model().cuda()
    prompt = torch.randint(0, 200, (6,), device="cuda")
    expected = greedy_reference(model, prompt, 30)
    assert generate(model, prompt, 30, temperature=0.0).tolist() == expected.tolist()
    output = generate(model.to(torch.bfloat16), prompt, 30, temperature=1.0, top_k=50)
    assert len(output) == 36 and output.max() < 200


def test_generate_stops_at_block_size():
    model = micro_model()
    block_size = model.config.block_size
    prompt = torch.randint(0, 200, (block_size - 10,))
    output = generate(model, prompt, 50, temperature=0.0)
    assert output.tolist() == greedy_reference(model, prompt, 10).tolist()
    output = generate(model, prompt[:-9], 50, temperature=0.0)
    assert len(output) == block_size


@pytest.mark.parametrize("eos_index", [0, 1, 7, 8, 9, 17, 28])  # around the batched EOS checks
def test_eos_stops_generation(eos_index):
    model = micro_model()
    prompt = torch.randint(0, 200, (5,))
    reference = greedy_reference(model, prompt, 30)
    new = reference[5:].tolist()
    eos_id = new[eos_index]
    first = new.index(eos_id)  # the token may occur earlier: generation ends at its first occurrence
    output = generate(model, prompt, 30, temperature=0.0, stop_ids=[eos_id])
    assert output.tolist() == reference[: 5 + first + 1].tolist()


def test_eos_never_generated_gives_full_length():
    model = micro_model()
    prompt = torch.randint(0, 200, (5,))
    reference = greedy_reference(model, prompt, 30)
    absent = next(i for i in range(200) if i not in reference[5:].tolist())
    assert generate(model, prompt, 30, temperature=0.0, stop_ids=[absent]).tolist() == reference.tolist()


def test_stop_ids_end_at_the_first_of_several():
    model = micro_model()
    prompt = torch.randint(0, 200, (5,))
    reference = greedy_reference(model, prompt, 30)
    new = reference[5:].tolist()
    stop_ids = [new[11], new[4], 199 if 199 not in new else 198]
    first = min(new.index(i) for i in stop_ids if i in new)
    output = generate(model, prompt, 30, temperature=0.0, stop_ids=stop_ids)
    assert output.tolist() == reference[: 5 + first + 1].tolist()


@pytest.mark.parametrize("stop", [False, True])
def test_on_token_streams_each_new_token(stop):
    model = micro_model()
    prompt = torch.randint(0, 200, (5,))
    reference = greedy_reference(model, prompt, 20)[5:].tolist()
    stop_ids = [reference[6]] if stop else []
    streamed = []
    output = generate(model, prompt, 20, temperature=0.0, stop_ids=stop_ids, on_token=streamed.append)
    expected = reference[: reference.index(reference[6]) + 1] if stop else reference
    assert streamed == expected and output[5:].tolist() == expected
    assert all(type(token) is int for token in streamed)


def test_generate_never_samples_padded_rows():
    model = micro_model(vocab_size=200)  # padded to 256
    assert model.config.padded_vocab_size == 256
    # padded rows whose logits win every argmax and take nearly all the probability mass
    model.lm_head.register_forward_hook(
        lambda module, inputs, logits: logits.index_fill(-1, torch.arange(200, 256), 50.0))
    with torch.no_grad():
        assert model(torch.arange(4)[None])[0].argmax(-1).min() >= 200
    prompt = torch.randint(0, 200, (4,))
    for temperature, top_k in [(0.0, None), (1.0, None), (1.0, 250), (2.0, 50)]:
        output = generate(model, prompt, 40, temperature=temperature, top_k=top_k)
        assert len(output) == 44 and output.max() < 200, (temperature, top_k)


def test_seeded_sampling_is_reproducible():
    model = micro_model()
    prompt = torch.randint(0, 200, (4,))
    runs = []
    for seed in [7, 7, 8]:
        torch.manual_seed(seed)
        runs.append(generate(model, prompt, 30, temperature=1.0, top_k=50, top_p=0.9).tolist())
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(prompt_length=64), "block_size=64"),
        (dict(prompt_length=100), "block_size=64"),
        (dict(prompt_length=0), "non-empty"),
    ],
)
def test_generate_argument_errors(kwargs, message):
    model = micro_model()
    prompt = torch.zeros(kwargs.pop("prompt_length", 4), dtype=torch.long)
    with pytest.raises(ValueError, match=message):
        generate(model, prompt, **{"max_new_tokens": 5, **kwargs})


# ---------------------------------------------------------------------------------------------------- sampling

PROBS = [0.5, 0.25, 0.15, 0.1]
ORDER = [2, 0, 3, 1]  # shuffled so that filtering must follow the values, not the positions


def shuffled_logits(probs=PROBS):
    return torch.tensor(probs, dtype=torch.float64).log()[ORDER].float()


def expected_probs(kept):
    """PROBS restricted to the indices in `kept`, renormalised, laid out in ORDER."""
    p = torch.tensor([PROBS[i] if i in kept else 0.0 for i in range(4)], dtype=torch.float64)
    return (p / p.sum())[ORDER].float()


@pytest.mark.parametrize(
    "top_k, top_p, kept",
    [
        (None, 1.0, {0, 1, 2, 3}),
        (None, 0.4, {0}),  # the most likely token alone already reaches 0.4
        (None, 0.7, {0, 1}),  # 0.5 < 0.7 <= 0.75
        (None, 0.8, {0, 1, 2}),  # 0.75 < 0.8 <= 0.9
        (None, 0.95, {0, 1, 2, 3}),
        (1, 1.0, {0}),
        (3, 1.0, {0, 1, 2}),
        (4, 1.0, {0, 1, 2, 3}),
        (100, 1.0, {0, 1, 2, 3}),  # larger than the vocabulary
        (3, 0.8, {0, 1}),  # top-k first: renormalised [0.56, 0.28, 0.17], 0.56 < 0.8 <= 0.83
    ],
)
def test_logits_to_probs_filters(top_k, top_p, kept):
    probs = logits_to_probs(shuffled_logits(), temperature=1.0, top_k=top_k, top_p=top_p)
    torch.testing.assert_close(probs, expected_probs(kept))


def test_logits_to_probs_temperature_and_batch():
    p = torch.tensor(PROBS, dtype=torch.float64)
    logits = torch.stack([shuffled_logits(), shuffled_logits([0.1, 0.2, 0.3, 0.4])])
    probs = logits_to_probs(logits, temperature=0.5)
    sharpened = p**2 / (p**2).sum()
    torch.testing.assert_close(probs[0], sharpened[ORDER].float())
    q = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    torch.testing.assert_close(probs[1], (q**2 / (q**2).sum())[ORDER].float())
    # row by row: the second row's nucleus at 0.5 is {0.4, 0.3}
    probs = logits_to_probs(logits, temperature=1.0, top_p=0.5)
    torch.testing.assert_close(probs[0], expected_probs({0}))
    expected = torch.tensor([0, 0, 0, 0.3, 0.4], dtype=torch.float64)[[3, 1, 4, 2]].float() / 0.7
    torch.testing.assert_close(probs[1], expected)


def test_top_k_keeps_exactly_k_with_ties():
    probs = logits_to_probs(torch.tensor([1.0, 3.0, 3.0, 3.0, 0.0]), top_k=2)
    assert (probs > 0).sum() == 2 and probs[[0, 4]].sum() == 0
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0))


def test_sample_greedy_cases_equal_argmax():
    torch.manual_seed(0)
    logits = torch.randn(500, 100) * 3
    argmax = logits.argmax(-1)
    assert torch.equal(sample(logits, temperature=0.0), argmax)
    assert torch.equal(sample(logits, temperature=0.0, top_k=5, top_p=0.5), argmax)
    assert torch.equal(sample(logits, temperature=1.0, top_k=1), argmax)
    assert torch.equal(sample(logits, temperature=1.5, top_p=1e-6), argmax)
    assert not torch.equal(sample(logits, temperature=1.0), argmax)


def test_sample_stays_within_top_k():
    torch.manual_seed(0)
    logits = torch.randn(4, 50).repeat_interleave(2000, dim=0)
    ids = sample(logits, temperature=2.0, top_k=5)
    allowed = logits.topk(5, dim=-1).indices
    assert (ids[:, None] == allowed).any(-1).all()
    for row in range(4):  # every one of the k tokens is reachable
        assert set(ids[row * 2000 : (row + 1) * 2000].tolist()) == set(allowed[row * 2000].tolist())


@pytest.mark.parametrize("top_p, kept", [(1.0, {0, 1, 2, 3}), (0.8, {0, 1, 2})])
def test_sample_frequencies_match_distribution(top_p, kept):
    torch.manual_seed(0)
    n = 40_000
    ids = sample(shuffled_logits().expand(n, 4), temperature=1.0, top_p=top_p)
    frequencies = torch.bincount(ids, minlength=4).double() / n
    expected = expected_probs(kept).double()
    sigma = (expected * (1 - expected) / n).sqrt()
    assert ((frequencies - expected).abs() <= 5 * sigma + 1e-12).all(), (frequencies, expected)


# ---------------------------------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """A micro GPT with random weights and a Llama-2-style sentencepiece BPE tokenizer trained on real Python code."""
    import sentencepiece as spm

    directory = tmp_path_factory.mktemp("checkpoint")
    text = Path(importlib.util.find_spec("argparse").origin).read_text()[:30_000]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_prefix=str(directory / "tokenizer"), vocab_size=400,
        model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    vocab_size = Tokenizer(directory).vocab_size
    config = Config.from_name("micro", vocab_size=vocab_size)
    assert config.padded_vocab_size > vocab_size  # so that the padded rows exist
    torch.manual_seed(0)
    save_model_dir(GPT(config).state_dict(), config, directory, directory)
    return directory


def test_cli_end_to_end(checkpoint_dir):
    prompt = "def parse_args(self"
    result = subprocess.run(
        [sys.executable, "generate/base.py", "--checkpoint_dir", str(checkpoint_dir), "--prompt", prompt,
         "--max_new_tokens", "20", "--temperature", "0.8", "--top_k", "50", "--top_p", "0.95", "--seed", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(prompt)
    assert len(result.stdout.strip()) > len(prompt)
    match = re.search(r"Generated (\d+) tokens in [\d.]+ s: ([\d.]+) tokens/s on cpu", result.stderr)
    assert match, result.stderr
    assert 1 <= int(match.group(1)) <= 20 and float(match.group(2)) > 0


def test_main_greedy_output(checkpoint_dir, capsys):
    from checkpoint import load_model

    prompt = "import sys"
    generate_base.main(checkpoint_dir, prompt=prompt, max_new_tokens=25, temperature=0.0)
    out, err = capsys.readouterr()
    tokenizer = Tokenizer(checkpoint_dir)
    model = load_model(checkpoint_dir)
    expected = greedy_reference(model, torch.tensor(tokenizer.encode(prompt, bos=True)), 25).tolist()
    if tokenizer.eos_id in expected[1:]:
        expected = expected[: expected.index(tokenizer.eos_id, 1) + 1]
    assert out == tokenizer.decode(expected) + "\n"
    assert out.startswith(prompt)
    assert "tokens/s on cpu" in err


def test_a_compiled_decode_cache_is_the_run_rounded_up_not_the_block_size():
    assert compiled_cache_length(10, 20, 2048) == 256
    assert compiled_cache_length(250, 6, 2048) == 256 and compiled_cache_length(250, 7, 2048) == 512
    assert compiled_cache_length(2000, 100, 2048) == 2048  # never past the block size


def test_main_compiled_sizes_the_cache_to_the_run(checkpoint_dir, monkeypatch, capsys):
    """With --compile the warm-up and the run share one cache length: the prompt plus max_new_tokens rounded up
    (here to a multiple of 16, under the micro model's block size of 64); --max_seq_length overrides it."""
    import generation

    lengths = []
    real_generate = generate_base.generate

    def eager_generate(model, prompt_ids, max_new_tokens, **settings):  # the wiring, without a compile
        lengths.append((len(prompt_ids), settings["max_seq_length"]))
        return real_generate(model, prompt_ids, max_new_tokens, **{**settings, "compiled": False})

    monkeypatch.setattr(generate_base, "generate", eager_generate)
    monkeypatch.setattr(generation, "CACHE_LENGTH_MULTIPLE", 16)
    generate_base.main(checkpoint_dir, prompt="import sys", max_new_tokens=25, temperature=0.0, compile=True)
    prompt_length = lengths[0][0]
    assert [length for _, length in lengths] == [-(-(prompt_length + 25) // 16) * 16] * 2 and lengths[0][1] < 64
    lengths.clear()
    generate_base.main(checkpoint_dir, prompt="import sys", max_new_tokens=25, temperature=0.0, compile=True,
                       max_seq_length=40)
    assert [length for _, length in lengths] == [40, 40]
    capsys.readouterr()


def test_main_bf16_on_cpu(checkpoint_dir, capsys):
    generate_base.main(checkpoint_dir, prompt="class", max_new_tokens=5, precision="bf16-true")
    out, err = capsys.readouterr()
    assert out.startswith("class") and "bf16-true on cpu" in err


@pytest.mark.parametrize("missing", ["lit_model.pth", "model_config.json", "tokenizer.model"])
def test_main_missing_checkpoint_file(checkpoint_dir, tmp_path, missing):
    for name in ["lit_model.pth", "model_config.json", "tokenizer.model"]:
        if name != missing:
            (tmp_path / name).symlink_to(checkpoint_dir / name)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        generate_base.main(tmp_path, max_new_tokens=5)


def test_main_argument_errors(checkpoint_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        generate_base.main(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="top_p"):
        generate_base.main(checkpoint_dir, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_base.main(checkpoint_dir, max_new_tokens=0)
    with pytest.raises(ValueError, match="precision"):
        generate_base.main(checkpoint_dir, precision="fp8")
    with pytest.raises(ValueError, match="block_size=64"):
        generate_base.main(checkpoint_dir, prompt="x = 1\n" * 100)


def test_main_tokenizer_larger_than_the_model(checkpoint_dir, tmp_path):
    """Token ids past the model's vocab_size would index rows that no token was trained on: a clear error."""
    (tmp_path / "tokenizer.model").symlink_to(checkpoint_dir / "tokenizer.model")
    config = Config.from_name("micro", vocab_size=Tokenizer(checkpoint_dir).vocab_size - 1)
    save_model_dir(GPT(config).state_dict(), config, tmp_path, tmp_path)
    message = (f"{tmp_path / 'tokenizer.model'} has {config.vocab_size + 1} tokens, more than the "
               f"vocab_size={config.vocab_size} of {tmp_path / 'model_config.json'}")
    with pytest.raises(ValueError, match=re.escape(message)):
        generate_base.main(tmp_path, max_new_tokens=5)
