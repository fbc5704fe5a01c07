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

from tokenizer import StreamDecoder, Tokenizer

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
# rendered chat prompts: special tokens at the start, in the middle, back to back, after spaces and newlines
LLAMA2_CHAT = "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello! </s><s>[INST] 2+2? [/INST]"
ZEPHYR_CHAT = "<|user|>\ncafé?</s>\n<|assistant|>\nNo </s> </s>\n\n<unk>x</s>"
CHATML_CHAT = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n日本語 😀 <tool> x<|im_end|>\n"
               "<|im_start|>assistant\n  two spaces<|im_end|><|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("sentencepiece"))


def train_sentencepiece(directory):
    """A Llama-2-style sentencepiece BPE (600 pieces, byte fallback) in `directory/tokenizer.model`; other tests'
    tokenizer too."""
    import sentencepiece as spm

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


def write_config(directory, **config) -> None:
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def test_sentencepiece_parse_special_matches_transformers_and_llama2_pipeline(sentencepiece_dir, tmp_path):
    """Control symbols written in a rendered prompt become their ids, and the pieces between them are encoded on
    their own: with the dummy prefix at the text's start only, as transformers 5's LlamaTokenizer does by default
    (legacy=False); on every piece with "legacy": true in tokenizer_config.json, as transformers' legacy mode and
    Llama-2's published tokenizer.json do."""
    ours, hf = Tokenizer(sentencepiece_dir), llama_tokenizer(sentencepiece_dir)
    shutil.copy(sentencepiece_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    write_config(tmp_path, legacy=True, add_bos_token=False)
    legacy, hf_legacy = Tokenizer(tmp_path), llama_tokenizer(tmp_path)
    reference = llama2_pipeline(sentencepiece_dir)
    reference.encode_special_tokens = False
    assert ours.add_bos_token and not legacy.add_bos_token
    for text in (LLAMA2_CHAT, ZEPHYR_CHAT, SPECIAL_TOKENS_AS_TEXT, "</s>", "x</s>y"):
        ids, legacy_ids = ours.encode(text, parse_special=True), legacy.encode(text, parse_special=True)
        assert legacy_ids == reference.encode(text, add_special_tokens=False).ids, text
        if not re.search("(<s>|</s>|<unk>) ", text):  # transformers' prefix-space difference (module docstring)
            assert ids == hf(text, add_special_tokens=False)["input_ids"], text
            assert legacy_ids == hf_legacy(text, add_special_tokens=False)["input_ids"], text
        assert ours.encode(text, bos=True, parse_special=True) == [1] + ids
    assert ours.encode(LLAMA2_CHAT, parse_special=True) != legacy.encode(LLAMA2_CHAT, parse_special=True)
    assert ours.encode("a</s>", parse_special=True)[-1] == 2 and 2 not in ours.encode("a</s>")


def test_sentencepiece_offsets_cover_the_text(sentencepiece_dir):
    ours = Tokenizer(sentencepiece_dir)
    for text in STRINGS + LEADING_SPACE + [LLAMA2_CHAT, ZEPHYR_CHAT]:
        for parse_special in (False, True):
            ids, offsets = ours.encode_with_offsets(text, parse_special=parse_special)
            assert ids == ours.encode(text, parse_special=parse_special)
            # in order, gapless, and each token's text is its span's (the dummy prefix "▁" adds an empty span)
            assert [start for start, _ in offsets] == sorted(start for start, _ in offsets)
            assert "".join(text[a:b] for (a, b), prev in zip(offsets, [None] + offsets[:-1]) if (a, b) != prev) == text
            for token_id, (start, end) in zip(ids, offsets):
                if not 3 <= token_id < 259 and token_id not in (1, 2):  # byte pieces share their character's span
                    piece = ours.processor.id_to_piece(token_id).replace("▁", " ")
                    assert piece.endswith(text[start:end]) and (start == end or piece.lstrip(" ") in text[start:end])
    # the bytes of one character all carry it, so a character span selects the whole character
    ids, offsets = ours.encode_with_offsets("a😀")
    assert offsets[-4:] == [(1, 2)] * 4 and all(3 <= i < 259 for i in ids[-4:])


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    return train_chatml_tokenizer(tmp_path_factory.mktemp("chatml"))


def train_chatml_tokenizer(directory):
    """A byte-level BPE tokenizer.json trained here, with ChatML's special tokens and a non-special added token."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    docs = [inspect.getdoc(obj) for _, obj in inspect.getmembers(importlib.import_module("pathlib"))]
    backend.train_from_iterator([doc for doc in docs if doc] + STRINGS, trainer)
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    backend.add_tokens([AddedToken("<tool>", special=False)])
    backend.save(str(directory / "tokenizer.json"))
    write_config(directory, tokenizer_class="PreTrainedTokenizerFast", bos_token=None, eos_token="<|im_end|>",
                 pad_token="<|endoftext|>")
    return directory


def test_tokenizer_json_parse_special_matches_tokenizers_and_transformers(chatml_dir):
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import AutoTokenizer

    ours, hf = Tokenizer(chatml_dir), AutoTokenizer.from_pretrained(chatml_dir)
    reference = HFTokenizer.from_file(str(chatml_dir / "tokenizer.json"))
    im_start, im_end, tool = (reference.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<tool>"))
    assert ours.special_tokens == {"<|endoftext|>": 0, "<|im_start|>": im_start, "<|im_end|>": im_end}
    assert ours.special_token_ids(["<|im_end|>", "<|im_start|>"]) == [im_end, im_start]
    with pytest.raises(ValueError, match="'<im_end>' is not a token of"):
        ours.special_token_ids(["<im_end>"])
    assert ours.special_token_strings == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    assert (ours.bos_id, ours.eos_id, ours.add_bos_token) == (None, im_end, False)
    for text in [CHATML_CHAT] + STRINGS:
        encoding = reference.encode(text, add_special_tokens=False)
        ids, offsets = ours.encode_with_offsets(text)
        assert ids == encoding.ids == hf(text, add_special_tokens=False)["input_ids"], text
        assert offsets == encoding.offsets
        assert ours.encode(text, parse_special=True) == ids
        literal = hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert ours.encode(text) == ours.encode_with_offsets(text, parse_special=False)[0] == literal
    ids = ours.encode(CHATML_CHAT, parse_special=True)
    assert ids.count(im_start) == 4 and ids.count(im_end) == 4
    # literal: special tokens are text; a non-special added token is a token either way, as in transformers
    assert im_start not in ours.encode(CHATML_CHAT) and tool in ours.encode(CHATML_CHAT)


def test_bos_from_the_post_processor(sentencepiece_dir, tmp_path):
    from tokenizers import processors

    reference = llama2_pipeline(sentencepiece_dir)
    reference.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    reference.save(str(tmp_path / "tokenizer.json"))
    assert Tokenizer(tmp_path).add_bos_token
    write_config(tmp_path, add_bos_token=False)
    assert not Tokenizer(tmp_path).add_bos_token
    llama2_pipeline(sentencepiece_dir).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").unlink()
    assert not Tokenizer(tmp_path).add_bos_token


def stream(tokenizer: Tokenizer, ids) -> list:
    decoder = StreamDecoder(tokenizer)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("kind", ["sentencepiece", "byte_level"])
def test_stream_decoder_equals_one_shot_decode(sentencepiece_dir, chatml_dir, kind):
    tokenizer = Tokenizer(sentencepiece_dir if kind == "sentencepiece" else chatml_dir)
    for text in STRINGS + LEADING_SPACE + ["x" + "😀" * 3 + " 日本語  \n\t y"]:
        ids = tokenizer.encode(text)
        pieces = stream(tokenizer, ids)
        assert "".join(pieces) == tokenizer.decode(ids), text
        assert all("\ufffd" not in piece for piece in pieces)  # never half a character
    # ids in any order (what a random model samples): byte pieces that never complete a character, special tokens
    generator = np.random.default_rng(0)
    for _ in range(100):
        ids = generator.integers(0, tokenizer.vocab_size, size=int(generator.integers(1, 30))).tolist()
        assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids), ids
    # a word's leading space comes with the word, once it is known
    hello = tokenizer.encode("a hello")
    assert "".join(stream(tokenizer, hello)) == "a hello"
