"""The built-in demo corpus, made at run time from text every Python installation has (no download):

- code: the standard library's .py files (tests and site-packages left out), one document per file;
- prose: their docstrings and whole-line comments in source order (one document per file), plus the Python
  documentation's reST sources when the python3-doc package is installed (/usr/share/doc/python3*/html/_sources).

    python prepare_data/prepare_demo.py --destination_path data/demo

Writes `tokenizer.model` (trained here on the train split unless present), shards `train/train_{code,prose}_*.bin`
and `validation/validation_{code,prose}_*.bin` with their manifests `{train,validation}/manifest_{code,prose}.json`,
`summary_code.json` and `summary_prose.json` (what each was packed from), and last `summary.json` (the settings and
both summaries), which makes a later call return at once if every shard is in a manifest (a corpus built before
manifests existed is rebuilt).

A standard library file goes to validation with probability validation_fraction, by a hash of its path, and its code
and its prose go there together: the prose is the code's own docstrings, so splitting them apart would put validation
text in the training data. A documentation file goes by a hash of its text.
"""

import ast
import glob
import sys
from functools import partial
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prepare_data.train_tokenizer import LineCounts, check_vocab_size, train_tokenizer
from shard_format import read_manifests, uncovered
from shard_packing import Job, check_packing_args, prepare
from text_readers import STDLIB, Report, hashed_split, read_whole_file, sample_documents, stdlib_files
from utils import UserError, cli, read_json, write_json

VOCAB_SIZE = 4096
CHUNK_SIZE = (256 + 1) * 64  # per shard: 64 blocks of the demo model's 256 tokens + 1 (the last target)
VALIDATION_FRACTION = 0.05
TOKENIZER_SAMPLE_CHARACTERS = 8_000_000
SPLITS = ("train", "validation")
DOCS_SOURCES = "/usr/share/doc/python3*/html/_sources"


def docs_files(max_files: Optional[int] = None) -> List[Path]:
    return sorted(p for d in glob.glob(DOCS_SOURCES) for p in Path(d).rglob("*.txt"))[:max_files]


def extract_prose(source: str) -> str:
    """The docstrings and whole-line comments of Python source, in source order; consecutive comment lines become one
    paragraph. (One ast pass: lines inside multi-line strings are not comments; tokenize would be twice as slow.)"""
    pieces: List[Tuple[int, str]] = []  # (line, text)
    inside_strings = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node)
            if docstring:
                pieces.append((node.body[0].lineno, docstring))
        elif isinstance(node, (ast.Constant, ast.JoinedStr)) and node.end_lineno > node.lineno:
            inside_strings.update(range(node.lineno + 1, node.end_lineno + 1))
    paragraph: List[str] = []
    start = 0
    for row, line in enumerate(source.splitlines(), 1):
        line = line.strip()
        is_comment = line.startswith("#") and row not in inside_strings
        text = line.lstrip("#").strip() if is_comment else ""
        if is_comment and (text.startswith("!") or "-*- coding" in text):
            continue
        if text:
            if not paragraph:
                start = row
            paragraph.append(text)
        elif paragraph and not is_comment:
            pieces.append((start, " ".join(paragraph)))
            paragraph = []
    if paragraph:
        pieces.append((start, " ".join(paragraph)))
    return "\n\n".join(text for _, text in sorted(pieces))


def read_prose(path: Path, report: Report) -> Iterator[Tuple[int, str]]:
    for line, text in read_whole_file(path, report):
        if path.suffix == ".py":
            try:
                text = extract_prose(text)
            except (SyntaxError, ValueError) as error:
                report.unreadable(path, f"not parseable as Python ({error})")
                return
        yield line, text


def split_key(path: Path, text: str) -> str:
    """What decides the split of a document: the path of its standard library file, shared by the file's code and
    prose documents; a documentation file's own text."""
    return path.relative_to(STDLIB).as_posix() if path.is_relative_to(STDLIB) else text


def read_train_documents(path: Path, report: Report, validation_fraction: float) -> Iterator[Tuple[int, str]]:
    """The whole files of the train split only: the tokenizer sees no validation document."""
    for line, text in read_whole_file(path, report):
        if hashed_split(split_key(path, text), validation_fraction) == "train":
            yield line, text


def prepare_demo(
    destination_path: Path = Path("data/demo"),
    vocab_size: int = VOCAB_SIZE,
    chunk_size: int = CHUNK_SIZE,
    validation_fraction: float = VALIDATION_FRACTION,
    max_files: Optional[int] = None,
    num_processes: Optional[int] = None,
    quiet: bool = False,
) -> Path:
    """Build the demo corpus in destination_path unless it is complete already; return destination_path.

    Args:
        destination_path: where tokenizer.model, the train/ and validation/ shards and the summaries are written
        vocab_size: the number of tokens of the tokenizer trained here
        chunk_size: tokens per shard
        validation_fraction: the share of source files whose documents go to the validation split (by a hash)
        max_files: use only the first max_files files of each source (for tests); none: all
        num_processes: processes that pack the files; none: all cores
        quiet: no progress bars or summaries
    """
    destination_path = Path(destination_path)
    # the flags first: the standard library is read and a tokenizer trained before the first shard is packed
    check_vocab_size(vocab_size)
    check_packing_args(chunk_size, num_processes)
    if not 0 < validation_fraction < 1:
        raise UserError(f"--validation_fraction must be in (0, 1): both splits need documents, got "
                        f"{validation_fraction}")
    if max_files is not None and max_files < 1:
        raise UserError(f"--max_files must be at least 1 (or none: all), got {max_files}")
    marker = destination_path / "summary.json"
    settings = dict(
        vocab_size=vocab_size, chunk_size=chunk_size, validation_fraction=validation_fraction, max_files=max_files
    )
    if marker.is_file():
        built = read_json(marker, "the summary of a demo corpus that prepare_demo.py wrote").get("settings")
        if built != settings:
            raise UserError(
                f"{destination_path} holds a demo corpus built with {built}; remove it to build one with {settings}"
            )
        if all(uncovered(sorted(destination_path.glob(f"{split}/*.bin")), read_manifests(destination_path / split))
               is None for split in SPLITS):
            return destination_path
        if not quiet:
            print(f"{destination_path}: shards without a manifest (built before manifests, or interrupted); rebuilding")

    code_files = stdlib_files(max_files)
    all_files = code_files + docs_files(max_files)
    sources = {"code": (read_whole_file, code_files), "prose": (read_prose, all_files)}
    tokenizer_path = destination_path / "tokenizer.model"
    if not tokenizer_path.is_file():  # trained on whole files: the code's docstrings and comments are the prose
        sample = sample_documents(
            all_files,
            partial(read_train_documents, validation_fraction=validation_fraction),
            TOKENIZER_SAMPLE_CHARACTERS,
            Report(),  # problems are reported when the same files are packed below
        )
        counts = LineCounts()
        train_tokenizer(sample, destination_path, vocab_size, counts)
        if not quiet:
            print(f"Wrote {tokenizer_path} ({vocab_size} tokens): trained on {counts.lines:,} lines, of which"
                  f" {counts.cut_lines:,} long ones were cut into {counts.pieces:,} pieces")

    reports = {}
    for name, (read, files) in sources.items():
        job = Job(
            read_documents=read,
            tokenizer_path=tokenizer_path,
            destination=destination_path,
            name=name,
            split=None,
            validation_fraction=validation_fraction,
            split_key=split_key,
            split_subdirs=True,
            chunk_size=chunk_size,
        )
        for stale in job.shards_on_disk(temporaries=True):  # from a build that was interrupted
            stale.unlink()
        reports[name] = prepare(job, files, num_processes, quiet=quiet).to_json()
    write_json(marker, {"settings": settings, **reports})
    return destination_path


if __name__ == "__main__":
    cli(prepare_demo)
