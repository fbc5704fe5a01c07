"""Tokenize your own corpus (plain text, .py, or .jsonl / .jsonl.zst with a text field) into train and validation
shards `{split}_{name}_{process}_*.bin`.

    python prepare_data/prepare_text.py --source_path "data/gutenberg/**/*.txt" \
        --tokenizer_path checkpoints/AMD-Llama-135m --destination_path data/gutenberg_packed --name gutenberg

A plain text or .py file is one document; a JSON lines file has one document per line. Each document goes to the
validation split with probability validation_fraction, by a hash of its text: the split is stable from run to run
and independent of file order and process count.
"""

import sys
from functools import partial
from pathlib import Path
from typing import Iterator, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prepare_data.common import (
    DEFAULT_CHUNK_SIZE, DTYPE_CHOICES, Job, Report, find_files, prepare, read_jsonl, read_text_file,
)  # fmt: skip

DIRECTORY_PATTERNS = ("**/*.txt", "**/*.py", "**/*.md", "**/*.rst", "**/*.jsonl", "**/*.jsonl.zst")
JSONL_SUFFIXES = (".jsonl", ".jsonl.zst")


def read_documents(path: Path, report: Report, text_key: str = "text") -> Iterator[Tuple[int, str]]:
    """Every line's `text_key` field of a JSON lines file, or the whole of any other file."""
    if path.name.endswith(JSONL_SUFFIXES):
        for line, record in read_jsonl(path, report):
            text = record.get(text_key)
            if not isinstance(text, str):
                report.skip(path, line, f"no string {text_key!r} field")
                continue
            yield line, text
    else:
        text = read_text_file(path, report)
        if text is not None:
            yield 1, text


def main(
    source_path: str = "data/text",
    tokenizer_path: Path = Path("checkpoints/AMD-Llama-135m"),
    destination_path: Path = Path("data/text_packed"),
    name: str = "text",
    validation_fraction: float = 0.01,
    text_key: str = "text",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    num_processes: Optional[int] = None,
    strict: bool = False,
    bos: bool = True,
    eos: bool = True,
    dtype: Optional[str] = None,
) -> Report:
    """source_path: a directory (searched for .txt, .py, .md, .rst, .jsonl, .jsonl.zst), a glob, or one file."""
    if not 0 <= validation_fraction <= 1:
        raise ValueError(f"validation_fraction must be in [0, 1], got {validation_fraction}")
    if not name or "/" in name:
        raise ValueError(f"name must be a non-empty file name part, got {name!r}")
    files = find_files(source_path, DIRECTORY_PATTERNS)
    job = Job(
        read_documents=partial(read_documents, text_key=text_key),
        tokenizer_path=Path(tokenizer_path),
        destination=Path(destination_path),
        name=name,
        split=None,
        validation_fraction=validation_fraction,
        chunk_size=chunk_size,
        bos=bos,
        eos=eos,
        strict=strict,
        dtype=dtype,
    )
    return prepare(job, files, num_processes)


if __name__ == "__main__":
    import argparse

    # flags left out take main()'s defaults
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], argument_default=argparse.SUPPRESS)
    parser.add_argument("--source_path", help="a directory, a glob (quote it) or a file")
    parser.add_argument("--tokenizer_path", type=Path, help="directory with tokenizer.model, or the file itself")
    parser.add_argument("--destination_path", type=Path)
    parser.add_argument("--name", help="shards are {split}_{name}_*.bin")
    parser.add_argument("--validation_fraction", type=float)
    parser.add_argument("--text_key", help="the field of a JSON line that holds the document")
    parser.add_argument("--chunk_size", type=int, help="tokens per shard")
    parser.add_argument("--num_processes", type=int, help="default: all cores")
    parser.add_argument("--strict", action="store_true", help="refuse the run at the first bad line or file")
    parser.add_argument("--bos", action=argparse.BooleanOptionalAction, help="BOS before each document (default)")
    parser.add_argument("--eos", action=argparse.BooleanOptionalAction, help="EOS after each document (default)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, help="default: uint16 when the vocabulary fits, else int32")
    main(**vars(parser.parse_args()))
