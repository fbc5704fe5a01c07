"""Tokenizer against transformers' LlamaTokenizer and the `tokenizers` library, on a sentencepiece BPE trained here.

Llama-2 semantics are sentencepiece's: a dummy prefix "▁" before the text, spaces as "▁", no normalization, byte
fallback, and "<s>" in the text is text. transformers 5's LlamaTokenizer differs in one place: it prepends the
dummy "▁" only when the text does not already start with a space (" x" -> "▁x", sentencepiece: "▁▁x"). Strings
with a leading space are therefore checked against Llama-2's published tokenizer.json pipeline instead.
"""

import importlib
import inspect
import json
import re
import shutil

import numpy as np
import pytest
import torch

from tokenizer import Tokenizer

# The trainer options of Llama-2's tokenizer.model (its trainer_spec and normalizer_spec)
LLAMA2_SENTENCEPIECE_OPTIONS = dict(
    model_type="bpe", byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
    allow_whitespace_only_pieces=True, character_coverage=0.99995,
)
STRINGS = [
    "Hello world",
    "The year 2024 had 366 days; 3.14159 is pi.",
    "café naïve façade – “quotes” … Ünïcödé",
    "日本語のテキスト and 中文",
    "emoji 😀👍🏽 and math ∑∫√",
    "line one\nline two\n\n  indented\ttab",
    "def f(x):\n    return x ** 2  # square\n",
    "trailing spaces   ",
    "a  b   c    d",
    "\nstarts with a newline",
    "",
]
LEADING_SPACE = [" leading space", "   three leading spaces", " ", "  2 digits"]
SPECIAL_TOKENS_AS_TEXT = "<s> and </s> are text here, as <unk> is"


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory):
    import sentencepiece as spm

    directory = tmp_path_factory.mktemp("sentencepiece")
    # real English prose (standard library docstrings) plus some non-ASCII, so that both vocabulary pieces and
    # byte fallback get used
    modules = ("argparse", "collections", "functools", "inspect", "itertools", "json", "pathlib", "re", "dataclasses")
    docs = [inspect.getdoc(obj) for name in modules for _, obj in inspect.getmembers(importlib.import_module(name))]
    text = "\n".join(doc for doc in docs if doc) + "\ncafé naïve 日本語 – “quotes” 2024\n" * 20
    (directory / "corpus.txt").write_text(text)
    spm.SentencePieceTrainer.train(
        input=str(directory / "corpus.txt"), model_prefix=str(directory / "tokenizer"), vocab_size=600,
        minloglevel=2, **LLAMA2_SENTENCEPIECE_OPTIONS,
    )
    (directory / "corpus.txt").unlink()
    (directory / "tokenizer.vocab").unlink()
    return directory


def llama_tokenizer(directory, **kwargs):
    from transformers import LlamaTokenizer

    return LlamaTokenizer.from_pretrained(directory, **kwargs)


def llama2_pipeline(directory):
    """Llama-2's published tokenizer.json pipeline (Prepend + Replace normalizer, no pre-tokenizer) run by the
    `tokenizers` library on the vocabulary and merges transformers extracts from `tokenizer.model`."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import normalizers

    backend = HFTokenizer.from_str(llama_tokenizer(directory).backend_tokenizer.to_str())
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    backend.encode_special_tokens = True  # "<s>" in the text is text, as in sentencepiece
    return backend


def test_sentencepiece_matches_llama_tokenizer(sentencepiece_dir):
    ours = Tokenizer(sentencepiece_dir)
    assert ours.backend == "sentencepiece"
    hf = llama_tokenizer(sentencepiece_dir, add_bos_token=True)
    hf_eos = llama_tokenizer(sentencepiece_dir, add_bos_token=False, add_eos_token=True)
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (hf.bos_token_id, hf.eos_token_id, len(hf)) == (1, 2, 600)
    for text in STRINGS:
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text) == ids, text
        assert ours.encode(text, bos=True) == hf(text)["input_ids"] == [1] + ids
        assert ours.encode(text, eos=True) == hf_eos(text)["input_ids"] == ids + [2]
        assert ours.decode(ids) == hf.decode(ids) == text
    assert any(3 <= i < 259 for i in ours.encode(STRINGS[4]))  # byte fallback: ids 3..258 are <0x00>..<0xFF>
    encoded = ours.encode(STRINGS[0], bos=True)
    assert type(encoded) is list and all(type(i) is int for i in encoded)
    # what generation hands back: a tensor, or an array; the tokenizer takes them without importing torch itself
    assert ours.decode(torch.tensor(encoded, dtype=torch.int)) == ours.decode(np.array(encoded)) == STRINGS[0]


def test_sentencepiece_follows_llama2_on_leading_spaces_and_special_tokens(sentencepiece_dir):
    ours = Tokenizer(sentencepiece_dir)
    reference = llama2_pipeline(sentencepiece_dir)
    for text in STRINGS + LEADING_SPACE + [SPECIAL_TOKENS_AS_TEXT]:
        assert ours.encode(text) == reference.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ours.encode(text)) == text
    assert ours.encode(" x")[0] != ours.encode("x")[0]  # the space before x is kept
    assert 1 not in ours.encode(SPECIAL_TOKENS_AS_TEXT) and 2 not in ours.encode(SPECIAL_TOKENS_AS_TEXT)


def test_llama2_tokenizer_json(sentencepiece_dir, tmp_path):
    """A Llama-2 style directory without tokenizer.model: tokenizer.json plus tokenizer_config.json."""
    reference = llama2_pipeline(sentencepiece_dir)
    reference.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    ours, sentencepiece = Tokenizer(tmp_path), Tokenizer(sentencepiece_dir)
    assert ours.backend == "huggingface"
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (1, 2, 600)
    for text in STRINGS + LEADING_SPACE + [SPECIAL_TOKENS_AS_TEXT]:
        assert ours.encode(text, bos=True, eos=True) == sentencepiece.encode(text, bos=True, eos=True), text
        assert ours.decode(ours.encode(text)) == text


def test_tokenizer_json_saved_by_transformers(sentencepiece_dir, tmp_path):
    llama_tokenizer(sentencepiece_dir, add_bos_token=True).save_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").unlink(missing_ok=True)
    ours, hf = Tokenizer(tmp_path), llama_tokenizer(tmp_path)
    assert ours.backend == "huggingface"
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (hf.bos_token_id, hf.eos_token_id, len(hf))
    # the same pipeline on both sides, so leading spaces agree too
    for text in STRINGS + LEADING_SPACE:
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text) == ids, text
        assert ours.encode(text, bos=True) == hf(text)["input_ids"]
    ids = hf(SPECIAL_TOKENS_AS_TEXT, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert ours.encode(SPECIAL_TOKENS_AS_TEXT) == ids


def test_tokenizer_file_and_errors(sentencepiece_dir, tmp_path):
    shutil.copy(sentencepiece_dir / "tokenizer.model", tmp_path / "renamed.model")
    assert Tokenizer(tmp_path / "renamed.model").encode("Hello") == Tokenizer(sentencepiece_dir).encode("Hello")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"No tokenizer.model or tokenizer.json in '{empty}'"):
        Tokenizer(empty)


def test_check_fits_names_the_tokenizer_file_and_the_model_config(sentencepiece_dir):
    tokenizer = Tokenizer(sentencepiece_dir)
    tokenizer.check_fits(600, "exact.json")  # every id has a row
    message = f"{sentencepiece_dir / 'tokenizer.model'} has 600 tokens, more than the vocab_size=599 of small.json"
    with pytest.raises(ValueError, match=re.escape(message)):
        tokenizer.check_fits(599, "small.json")

