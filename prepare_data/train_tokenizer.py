"""Train a sentencepiece BPE tokenizer like Llama-2's on a sample of a corpus: `{destination_path}/tokenizer.model`
(where tokenizer.Tokenizer finds it).

    python prepare_data/train_tokenizer.py --source_path "data/gutenberg/**/*.txt" \
        --destination_path checkpoints/my-model --vocab_size 32000

source_path is anything the preparers read: a directory or glob of JSON lines (.jsonl, .ndjson, their .zst) or .json
files (the `text` field), .parquet (the `content` column), or plain text and .py files (one document per file).
Training reads at most max_characters of text, spread evenly over the files in sorted order, and trains on its lines;
a line longer than sentencepiece's max_sentence_length is cut into pieces at spaces (sentencepiece would leave it out).
"""

import io
import os
import sys
from functools import partial
from pathlib import Path
from dataclasses import dataclass
from itertools import chain
from typing import Iterable, Iterator, List, Optional

import sentencepiece as spm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from text_readers import (
    PARQUET_SUFFIX, Report, TEXT_SUFFIXES, find_inputs, read_parquet_documents, read_text_documents,
    sample_documents, suffix_of,
)
from utils import UserError, atomic_write, cli

VOCAB_SIZE = 32000
MAX_CHARACTERS = 100_000_000  # of text sampled for training; sentencepiece keeps it all in memory
# Llama-2's trainer_spec and normalizer_spec (read from its tokenizer.model), apart from input and vocabulary size:
# byte fallback (no <unk> for unseen characters), digits split one by one, runs of spaces kept as pieces (code
# indentation), no normalization, and a dummy prefix space, so "Hello" at the start encodes like " Hello" inside text.
LLAMA2_SPEC = dict(
    model_type="bpe",
    character_coverage=0.99995,
    byte_fallback=True,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    remove_extra_whitespaces=False,
    add_dummy_prefix=True,
    normalization_rule_name="identity",
    max_sentence_length=4192,  # bytes; sentencepiece leaves longer lines out, so training_lines cuts them
    max_sentencepiece_length=16,
    split_by_unicode_script=True,
    split_by_number=True,
    split_by_whitespace=True,
    treat_whitespace_as_suffix=False,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
)


MIN_VOCAB_SIZE = 3 + 256  # <unk>, <s>, </s> and the byte pieces of byte fallback; the text's characters add more


class NoTextError(UserError):
    """Nothing but blank lines to train on."""


@dataclass
class LineCounts:
    """What train_tokenizer trained on."""

    lines: int = 0  # non-blank lines trained on, each cut line counted once
    cut_lines: int = 0  # longer than max_sentence_length, cut into pieces
    pieces: int = 0  # the non-blank pieces of the cut lines
    invalid_lines: int = 0  # with a lone surrogate (possible in JSON), which no tokenizer takes: left out


def cut_line(line: str, max_bytes: int) -> List[str]:
    """`line` in pieces of at most max_bytes UTF-8 bytes, each cut at its last space (which is dropped), or at the
    last character that fits when the piece has no space."""
    data = line.encode()
    pieces = []
    while len(data) > max_bytes:
        cut = data.rfind(b" ", 1, max_bytes + 1)
        if cut > 0:
            pieces.append(data[:cut])
            data = data[cut + 1 :]
        else:
            cut = max_bytes
            while data[cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte: move back to the character's start
                cut -= 1
            pieces.append(data[:cut])
            data = data[cut:]
    return [piece.decode() for piece in pieces + [data]]


def training_lines(documents: Iterable[str], max_bytes: int, counts: LineCounts) -> Iterator[str]:
    """The non-blank lines of `documents`, those longer than max_bytes cut into non-blank pieces."""
    for text in documents:
        for line in text.split("\n"):
            if not line.strip():
                continue
            try:
                size = len(line.encode())
            except UnicodeEncodeError:
                counts.invalid_lines += 1
                continue
            counts.lines += 1
            if size <= max_bytes:
                yield line
                continue
            counts.cut_lines += 1
            for piece in cut_line(line, max_bytes):
                if piece.strip():
                    counts.pieces += 1
                    yield piece


def train_tokenizer(
    documents: Iterable[str], destination_path: Path, vocab_size: int = VOCAB_SIZE, counts: Optional[LineCounts] = None
) -> Path:
    """Train on the non-blank lines of `documents` (counted in `counts`); write `{destination_path}/tokenizer.model`
    atomically."""
    counts = LineCounts() if counts is None else counts
    sentences = training_lines(documents, LLAMA2_SPEC["max_sentence_length"], counts)
    first = next(sentences, None)
    if first is None:  # sentencepiece would fail with "INTERNAL: ... [!sentences_.empty()]"
        raise NoTextError(f"no text to train a tokenizer on: every line is blank or invalid ({counts.invalid_lines}"
                          f" lines with a lone surrogate)")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=chain([first], sentences),
            model_writer=model,
            vocab_size=vocab_size,
            num_threads=os.cpu_count() or 1,
            minloglevel=1,
            **LLAMA2_SPEC,
        )
    except RuntimeError as error:  # a vocabulary too small for the text's characters, or too large for the text
        if "vocab" not in str(error).lower():
            raise
        reason = str(error).rpartition("] ")[2].strip()
        raise UserError(f"--vocab_size {vocab_size} does not fit the text: {reason}") from None
    path = Path(destination_path) / "tokenizer.model"
    with atomic_write(path) as tmp:
        tmp.write_bytes(model.getvalue())
    return path


def check_vocab_size(vocab_size: int) -> None:
    """Refuse a vocabulary that cannot hold the special and byte pieces, before any text is read."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise UserError(f"--vocab_size must be at least {MIN_VOCAB_SIZE} (<unk>, <s>, </s> and the 256 byte pieces), "
                        f"got {vocab_size}")


def read_any(path: Path, report: Report, text_key: str = "text") -> Iterator:
    """The documents of a file of any input format the preparers know, by its suffix."""
    if suffix_of(path, [PARQUET_SUFFIX]):
        return read_parquet_documents(path, report)
    return read_text_documents(path, report, text_key=text_key)


def main(
    source_path: str = "data/text",
    destination_path: Path = Path("checkpoints/my-tokenizer"),
    vocab_size: int = VOCAB_SIZE,
    max_characters: int = MAX_CHARACTERS,
    text_key: str = "text",
) -> Path:
    """Train a Llama-2-style BPE tokenizer on a sample of source_path; write destination_path/tokenizer.model.

    Args:
        source_path: a directory, a glob (quote it) or a file: .jsonl(.zst), .ndjson(.zst), .json, .parquet, text, .py
        destination_path: tokenizer.model is written here
        vocab_size: the number of tokens
        max_characters: text sampled for training, spread evenly over the files (sentencepiece keeps it in memory)
        text_key: the field of a JSON line that holds the document
    """
    check_vocab_size(vocab_size)
    if max_characters < 1:
        raise UserError(f"--max_characters must be at least 1, got {max_characters}")
    files, unknown_files = find_inputs(source_path, [*TEXT_SUFFIXES, PARQUET_SUFFIX])
    report, counts = Report(), LineCounts()
    documents = sample_documents(files, partial(read_any, text_key=text_key), max_characters, report)
    try:
        path = train_tokenizer(documents, destination_path, vocab_size, counts)
    except NoTextError:
        raise NoTextError(
            f"No text to train a tokenizer on in {source_path!r}: {len(files)} files, {report.skipped} bad lines or"
            f" documents skipped, {report.unreadable_files} unreadable files, {counts.invalid_lines} lines with a lone"
            f" surrogate, the rest empty or blank"
            + "".join(f"\n  {problem}" for problem in report.problems)
        ) from None
    max_bytes = LLAMA2_SPEC["max_sentence_length"]
    print(f"Wrote {path} ({vocab_size} tokens) from {len(files)} files ({unknown_files} of other extensions skipped):"
          f" {counts.lines:,} lines, of which"
          f" {counts.cut_lines:,} longer than {max_bytes} bytes were cut into {counts.pieces:,} pieces; left out"
          f" {counts.invalid_lines:,} lines with a lone surrogate")
    if report.skipped or report.unreadable_files:
        print(f"Skipped {report.skipped} bad lines or documents and {report.unreadable_files} unreadable files:")
        print("\n".join(f"  {problem}" for problem in report.problems))
    return path


if __name__ == "__main__":
    cli(main)
