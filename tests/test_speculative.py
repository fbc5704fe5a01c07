"""generate/speculative.py: greedy speculative decoding against the target's own greedy decoding, sampled speculative
decoding against the target's exact sampling distribution (chi-square), the KV caches after rejections against a
fresh prefill, Hugging Face's assisted generation on the same pair, vocabulary-prefix drafts and the command line."""

import itertools
import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from scipy.stats import chisquare

from checkpoint import load_model, save_model_dir
import generate.speculative as speculative_module
from generate.speculative import main
from generation import encode_prompt, generate, logits_to_probs
from speculative import SpeculativeStats, check_tokenizers_agree, speculative_generate
from model import GPT, Config
from tokenizer import Tokenizer
from utils import UserError, cli


def tiny_pair(vocab_size: int = 48, draft_vocab_size=None, block_size: int = 64, seed: int = 0):
    """A 2-layer float64 target and a 1-layer draft made of its first layer (a related pair: alpha ~0.4 greedy)."""
    torch.manual_seed(seed)
    shape = dict(block_size=block_size, padding_multiple=8, n_head=4, n_embd=32, n_query_groups=2,
                 intermediate_size=64)
    target = GPT(Config(n_layer=2, vocab_size=vocab_size, **shape)).double().eval()
    draft = GPT(Config(n_layer=1, vocab_size=draft_vocab_size or vocab_size, **shape)).double().eval()
    rows = draft.config.padded_vocab_size  # the draft keeps the first rows of the target's embedding and head
    draft.load_state_dict({key: value[:rows] if key in ("transformer.wte.weight", "lm_head.weight") else value
                           for key, value in target.state_dict().items() if key in draft.state_dict()})
    return target, draft


def test_greedy_speculative_is_the_target_greedy_output():
    """k = 1..8, a batch of prompts of different lengths (one near the block size, so rows stop at different rounds)
    and batch 1; the draft == target case accepts every token."""
    target, draft = tiny_pair()
    prompts = [torch.randint(0, 48, (n,)) for n in (1, 5, 17, 58)]
    expected = [generate(target, prompt, 24, temperature=0.0).tolist() for prompt in prompts]
    assert len(expected[3]) == 64 and len(set(expected[1][5:])) > 3
    for k in range(1, 9):
        stats = SpeculativeStats()
        outputs = speculative_generate(target, draft, prompts, 24, speculative_k=k, temperature=0.0, stats=stats)
        assert [output.tolist() for output in outputs] == expected, k
        assert stats.new_tokens == sum(len(e) for e in expected) - sum(len(p) for p in prompts)
        assert 0 < stats.accepted < stats.drafted and stats.rejections > 0
        single = speculative_generate(target, draft, prompts[1:2], 24, speculative_k=k, temperature=0.0)
        assert single[0].tolist() == expected[1]
    stats = SpeculativeStats()
    outputs = speculative_generate(target, target, prompts[:3], 24, speculative_k=5, temperature=0.0, stats=stats)
    assert [output.tolist() for output in outputs] == expected[:3]
    assert stats.rejections == 0 and stats.accepted == stats.drafted and stats.summary()["alpha"] == 1.0
    # 23 tokens after the prefill's first, in rounds of 6: 6 + 6 + 6 + 5 per row
    assert stats.rounds == 3 * 4 and stats.summary()["tokens_per_target_forward"] == 23 / 4


def test_adaptive_k_and_stop_ids():
    target, draft = tiny_pair()
    prompts = [torch.randint(0, 48, (n,)) for n in (3, 9)]
    expected = [generate(target, prompt, 30, temperature=0.0).tolist() for prompt in prompts]
    outputs = speculative_generate(target, draft, prompts, 30, speculative_k=2, adaptive=True, temperature=0.0)
    assert [output.tolist() for output in outputs] == expected
    outputs = speculative_generate(target, target, prompts, 30, speculative_k=1, adaptive=True, temperature=0.0)
    assert [output.tolist() for output in outputs] == expected
    stop = expected[0][3 + 7]
    outputs = speculative_generate(target, draft, prompts, 30, speculative_k=4, temperature=0.0, stop_ids=[stop])
    for prompt, output, full in zip(prompts, outputs, expected):
        assert output.tolist() == generate(target, prompt, 30, temperature=0.0, stop_ids=[stop]).tolist()
        assert output.tolist() == full[: len(output)] and (len(output) == len(full) or output[-1] == stop)


def test_caches_after_rejections_equal_a_fresh_prefill():
    """Rows that rejected drafts rewound both caches: the slots each model has seen hold what a prefill of the
    accepted sequence writes (the target's up to its last token, the draft's up to the one before)."""
    target, draft = tiny_pair()
    prompts = [torch.randint(0, 48, (n,)) for n in (4, 11, 6)]
    stats = SpeculativeStats()
    outputs = speculative_generate(target, draft, prompts, 13, speculative_k=4, temperature=0.0, stats=stats,
                                   max_seq_length=40)
    assert stats.rejections > 3
    for model, unseen in ((target, 1), (draft, 2)):
        used = [(block.attn.kv_cache.k, block.attn.kv_cache.v) for block in model.transformer.h]
        for row, output in enumerate(outputs):
            n = len(output) - unseen
            model.set_kv_cache(batch_size=1, max_seq_length=40)
            with torch.inference_mode():
                model(output[None, :n], torch.arange(n))
            for (k, v), cache in zip(used, (block.attn.kv_cache for block in model.transformer.h)):
                torch.testing.assert_close(k[row, :, :n], cache.k[0, :, :n], rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(v[row, :, :n], cache.v[0, :, :n], rtol=1e-12, atol=1e-12)


def test_draft_with_a_prefix_vocabulary():
    """A draft of 40 ids for a target of 48: it never proposes the 8 it lacks and reads id 0 for them (its
    embedding has 40 rows: any other id would fail), and the greedy output is still the target's."""
    target, draft = tiny_pair(vocab_size=48, draft_vocab_size=40)
    with torch.no_grad():
        target.lm_head.weight[40:48] *= 3  # the target often emits the ids the draft lacks
    prompts = [torch.tensor([1, 45, 3, 47]), torch.randint(0, 48, (9,))]
    expected = [generate(target, prompt, 30, temperature=0.0).tolist() for prompt in prompts]
    assert sum(token >= 40 for token in expected[0][4:] + expected[1][9:]) >= 5
    proposals = []
    draft.lm_head.register_forward_hook(lambda module, inputs, logits: proposals.append(logits.argmax(-1)))
    outputs = speculative_generate(target, draft, prompts, 30, speculative_k=3, temperature=0.0, draft_unk_id=0)
    assert [output.tolist() for output in outputs] == expected
    torch.manual_seed(0)
    stats = SpeculativeStats()
    speculative_generate(target, draft, prompts, 30, speculative_k=3, temperature=1.0, stats=stats)
    assert stats.accepted > 0 and max(p.max() for p in proposals) < 40


def sequence_probabilities(model: GPT, prompt: torch.Tensor, length: int, **sampling) -> torch.Tensor:
    """The exact probability of each continuation of `length` tokens under the model's warped sampling, by
    enumeration with full forward passes: (V ** length,), continuations in lexicographic order."""
    V = model.config.vocab_size
    continuations = torch.tensor(list(itertools.product(range(V), repeat=length)))
    idx = torch.cat([prompt.expand(len(continuations), -1), continuations], dim=1)
    with torch.no_grad():
        logits = model(idx)[:, len(prompt) - 1 : -1, :V]
    probs = logits_to_probs(logits, **sampling).double()
    return probs.gather(-1, continuations[..., None])[..., 0].prod(-1)


def test_sampled_speculative_has_the_target_distribution():
    """The first three tokens of 6,000 rows (one batch), with temperature, top-k and top-p and a prefix-vocabulary
    draft, against the target's exact distribution (chi-square; the draft's own distribution fails the same test)."""
    target, draft = tiny_pair(vocab_size=8, draft_vocab_size=6, seed=1)
    with torch.no_grad():  # the small vocabulary's logits are flat; sharpen them a little
        target.lm_head.weight *= 4
        draft.lm_head.weight *= 4
    sampling = dict(temperature=0.9, top_k=6, top_p=0.95)
    prompt = torch.tensor([3, 1, 4, 1, 5])
    rows = 6000
    torch.manual_seed(0)
    stats = SpeculativeStats()
    outputs = speculative_generate(target, draft, [prompt] * rows, 3, speculative_k=2, stats=stats, **sampling)
    assert 0.2 < stats.summary()["alpha"] < 0.95  # both accepted and rejected drafts shape the sample
    codes = sum(torch.stack(outputs)[:, 5 + i] * 8 ** (2 - i) for i in range(3))
    observed = torch.bincount(codes, minlength=8**3).double()
    for model, should_pass in ((target, True), (draft, False)):
        expected = sequence_probabilities(model, prompt, 3, **sampling) * rows
        if model is draft:  # the draft's 6 ids padded to the target's 8
            expected = torch.zeros(8, 8, 8, dtype=torch.float64).index_put_(
                torch.meshgrid(*[torch.arange(6)] * 3, indexing="ij"), expected.view(6, 6, 6)).flatten()
        if observed[expected == 0].sum() > 0:  # draws the model cannot make
            p_value = 0.0
        else:  # pool the cells expected to hold fewer than 5 draws, as a chi-square test needs
            small = (expected < 5) & (expected > 0)
            obs = torch.cat([observed[expected >= 5], observed[small].sum()[None]])
            exp = torch.cat([expected[expected >= 5], expected[small].sum()[None]])
            p_value = chisquare(obs.numpy(), exp.numpy() * rows / exp.sum().item()).pvalue
        assert (p_value > 1e-3) == should_pass, p_value


def test_hf_assisted_generation_gives_the_same_greedy_output():
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf import hf_config, hf_state_dict

    target, draft = tiny_pair()
    hf_models = []
    for model in (target, draft):
        config = LlamaConfig(**hf_config(model.config, "float64", None, None))
        hf_model = LlamaForCausalLM(config).double().eval()
        hf_model.load_state_dict(hf_state_dict(model.state_dict(), model.config), strict=False)
        hf_models.append(hf_model)
    prompt = torch.randint(0, 48, (7,))
    hf_output = hf_models[0].generate(prompt[None], assistant_model=hf_models[1], do_sample=False, max_new_tokens=25,
                                      min_new_tokens=25, num_assistant_tokens=5, pad_token_id=0)
    ours = speculative_generate(target, draft, [prompt], 25, speculative_k=5, adaptive=True, temperature=0.0)
    assert ours[0].tolist() == hf_output[0].tolist()


def test_tokenizer_mismatch_is_refused(tmp_path):
    import sentencepiece as spm

    text = Path(json.__file__).read_text()
    for vocab_size in (400, 450):
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(text.splitlines()), model_prefix=str(tmp_path / f"tok{vocab_size}"),
            vocab_size=vocab_size, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            minloglevel=2)
    a, b = Tokenizer(tmp_path / "tok400.model"), Tokenizer(tmp_path / "tok450.model")
    check_tokenizers_agree(a, a, tmp_path / "a", tmp_path / "a")
    with pytest.raises(UserError, match=re.escape(f"--draft_checkpoint_dir {tmp_path / 'b'}")):
        check_tokenizers_agree(a, b, tmp_path / "a", tmp_path / "b")


def checkpoint_pair(directory: Path):
    """tiny_pair in fp32 as checkpoint directories directory/target and directory/draft, with a sentencepiece BPE
    tokenizer trained on real Python code."""
    import sentencepiece as spm

    text = Path(json.__file__).read_text()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_prefix=str(directory / "tokenizer"), vocab_size=400,
        model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    target, draft = tiny_pair(vocab_size=400)
    for name, model in (("target", target), ("draft", draft)):
        save_model_dir(model.float().state_dict(), model.config, directory, directory / name)
    return directory / "target", directory / "draft"


def test_command_line_batches_prompts_and_reports_acceptance(tmp_path, capsys):
    """The CLI on a checkpoint pair made here: two prompts in a batch, greedy, as many new tokens as the target alone
    gives each (generation.generate, stopping at EOS as the CLI does)."""
    target_dir, draft_dir = checkpoint_pair(tmp_path)
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("def loads(s):\nclass JSONDecoder:\\n    def\n")
    summary = main(target_dir, draft_dir, prompts_file=prompts_file, batch_size=2, max_new_tokens=12, speculative_k=3)
    out, err = capsys.readouterr()
    assert out.startswith("def loads(s):") and "\nclass JSONDecoder:" in out
    assert re.search(r"^\d+ tokens in [\d.]+ s \([\d.]+ tokens/s on cpu\); alpha [\d.]+, acceptance rate [\d.]+", err,
                     re.M)
    target, tokenizer = load_model(target_dir), Tokenizer(target_dir)
    alone = [generate(target, encode_prompt(tokenizer, text, torch.device("cpu")), 12, temperature=0.0,
                      stop_ids=[tokenizer.eos_id]) for text in ("def loads(s):", "class JSONDecoder:\n    def")]
    assert summary["new_tokens"] == sum(len(ids) - len(encode_prompt(tokenizer, text, torch.device("cpu")))
                                        for ids, text in zip(alone, ("def loads(s):", "class JSONDecoder:\n    def")))
    # HumanEval's 164 prompts in one batch: those longer than the block keep their end (BOS + the last tokens)
    summary = main(target_dir, draft_dir, prompts="humaneval", batch_size=164, max_new_tokens=4, speculative_k=2)
    assert 164 < summary["new_tokens"] <= 164 * 4 and summary["rounds"] >= 164
    assert "return" in capsys.readouterr().out


def test_documented_command_on_a_local_pair(tmp_path, capsys):
    """The module docstring's command, with a tiny pair in place of CodeLlama-7b and AMD-Llama-135m-code."""
    command = speculative_module.__doc__.split("python generate/speculative.py ")[1].split("\n\n")[0]
    words = shlex.split(command.replace("\\\n", " "))
    flags = dict(zip(words[::2], words[1::2]))
    assert set(flags) == {"--checkpoint_dir", "--draft_checkpoint_dir", "--prompt", "--speculative_k",
                          "--max_new_tokens", "--temperature"}
    target_dir, draft_dir = checkpoint_pair(tmp_path)
    flags.update({"--checkpoint_dir": str(target_dir), "--draft_checkpoint_dir": str(draft_dir),
                  "--max_new_tokens": "20"})
    results = cli(main, [word for pair in flags.items() for word in pair])
    assert capsys.readouterr().out.startswith(flags["--prompt"]) and results["drafted"] > 0
