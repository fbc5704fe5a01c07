"""What the data preparers share: finding input files, the readers of JSON (lines or an array), text and parquet
files with bad input counted, documents -> token ids with BOS/EOS separators, and the process pool that packs shards
with one PackedDatasetBuilder per process.

A preparer supplies a `read_documents(path, report)` generator that yields `(line, text)` for each document of one
input file (line: the line or row number, for messages) and records what it skips in `report`. `prepare` does the
rest: it splits the sorted files across processes, encodes and packs every document, shows progress, prints a
summary and writes it as JSON next to the shards, and last the run's manifest (see `shard_format.py`).

Imports no torch (nor anything that does), so each packing process starts in a fraction of a second.
"""

import glob
import hashlib
import io
import json
import os
import queue
import resource
import signal
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Literal, Optional, Sequence, Tuple, Union, get_args

import numpy as np
import zstandard
from tqdm import tqdm

from shard_format import PackedDatasetBuilder, file_sha256, manifest_name, token_dtype, write_manifest
from tokenizer import Tokenizer
from utils import UserError, write_json

DEFAULT_CHUNK_SIZE = (2048 + 1) * 1024  # tokens per shard, as TinyLlama
FLUSH_TOKENS = 1 << 18  # ids are handed to the builder in arrays of about this many tokens
MAX_LISTED_PROBLEMS = 20  # skipped lines listed in the summary per process (all are counted)
TokenDtype = Literal["uint16", "int32"]  # of the shards' token ids: the preparers' `dtype` parameter
DTYPE_CHOICES = get_args(TokenDtype)  # checked at run time too, for callers from Python
# The input formats, by file extension in any case: what read_text_documents reads (whole files, JSON lines, and
# .json: a JSON array when its first non-space byte is "[", as Alpaca's files, else JSON lines), and parquet files
WHOLE_FILE_SUFFIXES = (".txt", ".py", ".md", ".rst")
JSON_LINES_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.zst", ".ndjson.zst")
JSON_SUFFIX = ".json"
TEXT_SUFFIXES = (*WHOLE_FILE_SUFFIXES, *JSON_LINES_SUFFIXES, JSON_SUFFIX)
PARQUET_SUFFIX = ".parquet"
PARQUET_TEXT_COLUMN = "content"  # as in bigcode/starcoderdata
PARQUET_LANGUAGE_COLUMN = "lang"

ReadDocuments = Callable[[Path, "Report"], Iterator[Tuple[int, str]]]
SplitKey = Callable[[Path, str], str]


class BadInputError(UserError):
    """Bad input seen with --strict: the run is refused."""


class NothingWrittenError(UserError):
    """A run that read its files but kept no document: a wrong --text_key, or nothing but bad input."""


class Terminated(SystemExit):
    """SIGTERM, raised in the main process while `prepare` runs so that its cleanup runs; exits with status 143."""


@dataclass
class Report:
    """What one run (or one process of it) read, kept, skipped and wrote. Bad input is recorded with `skip` (a line
    or document) or `unreadable` (a whole file, or its rest); with strict=True both raise BadInputError instead."""

    strict: bool = False
    documents: Dict[str, int] = field(default_factory=Counter)  # kept, by split
    tokens: Dict[str, int] = field(default_factory=Counter)  # written, separators included, by split
    characters: int = 0  # of the kept documents
    excluded: Dict[str, int] = field(default_factory=Counter)  # documents dropped on purpose, by set or language
    empty_documents: int = 0  # no non-whitespace character: not written
    skipped: int = 0  # malformed lines, invalid UTF-8, missing text field
    unreadable_files: int = 0
    unknown_files: int = 0  # of another extension, skipped by a directory walk
    problems: List[str] = field(default_factory=list)  # "file:line: reason", every unreadable file, the first skips
    input_files: int = 0
    input_bytes: int = 0
    shards: List[str] = field(default_factory=list)
    max_token_id: int = -1  # of every token written
    seconds: float = 0.0  # wall time of the run
    cpu_seconds: float = 0.0  # CPU time of the packing, all processes together (start-up and imports excluded)
    peak_memory_mb: float = 0.0  # the largest resident set of any process that packed

    def skip(self, path: Path, line: int, reason: str) -> None:
        message = f"{path}:{line}: {reason}"
        if self.strict:
            raise BadInputError(f"{message} (refused because of --strict)")
        self.skipped += 1
        if self.skipped <= MAX_LISTED_PROBLEMS:
            self.problems.append(message)

    def unreadable(self, path: Path, reason: str) -> None:
        message = f"{path}: {reason}"
        if self.strict:
            raise BadInputError(f"{message} (refused because of --strict)")
        self.unreadable_files += 1
        self.problems.append(message)

    def merge(self, other: "Report") -> None:
        for name in ("documents", "tokens", "excluded"):
            getattr(self, name).update(getattr(other, name))
        for name in ("characters", "empty_documents", "skipped", "unreadable_files", "input_files", "input_bytes"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.cpu_seconds += other.cpu_seconds
        self.problems += other.problems
        self.shards += other.shards
        self.peak_memory_mb = max(self.peak_memory_mb, other.peak_memory_mb)
        self.max_token_id = max(self.max_token_id, other.max_token_id)

    def to_json(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "strict"}
        return {name: dict(value) if isinstance(value, Counter) else value for name, value in values.items()}


def is_glob(source: Union[str, Path]) -> bool:
    """Whether `source` is a pattern for glob.glob rather than a path."""
    return any(char in str(source) for char in "*?[")


def find_files(source: Union[str, Path], patterns: Sequence[str]) -> List[Path]:
    """Sorted input files. `source` is a file, a glob (`data/**/*.txt`), or a directory searched with `patterns`."""
    source = str(source)
    if is_glob(source):
        files = {Path(p) for p in glob.glob(source, recursive=True) if os.path.isfile(p)}
        if not files:
            raise FileNotFoundError(f"No files match {source!r}")
        return sorted(files)
    root = Path(source)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"{str(root)!r} does not exist")
    files = {p for pattern in patterns for p in root.glob(pattern) if p.is_file()}
    if not files:
        raise FileNotFoundError(f"No files matching {' or '.join(patterns)} in {str(root)!r}")
    return sorted(files)


def suffix_of(path: Path, suffixes: Sequence[str]) -> Optional[str]:
    """The longest of `suffixes` that the file name ends with, in any case (".ndjson", not ".json"); None if none."""
    name = path.name.lower()
    return max((suffix for suffix in suffixes if name.endswith(suffix)), key=len, default=None)


def find_inputs(source: Union[str, Path], suffixes: Sequence[str]) -> Tuple[List[Path], int]:
    """Sorted input files with one of `suffixes` (in any case), and the number of other files skipped. `source` is a
    file, a glob or a directory searched recursively; a file or glob that names another kind of file is refused."""
    files = find_files(source, ["**/*"])
    known = [path for path in files if suffix_of(path, suffixes)]
    unknown = len(files) - len(known)
    if unknown and (is_glob(source) or not Path(source).is_dir()):
        path = next(path for path in files if not suffix_of(path, suffixes))
        raise ValueError(f"{path}: unknown file extension; expected one of {' '.join(suffixes)} (in any case)")
    if not known:
        raise FileNotFoundError(f"No {' or '.join(suffixes)} files in {str(source)!r} ({unknown} other files)")
    return known, unknown


class ZstdReader(io.RawIOBase):
    """The decompressed bytes of a .zst file, all frames, streamed. Unlike zstandard's stream_reader, which returns a
    short stream without complaint, a file that ends inside a frame (an interrupted download) raises ZstdError."""

    read_size = 1 << 18

    def __init__(self, raw) -> None:
        self.raw = raw
        self.decompressor = zstandard.ZstdDecompressor()
        self.frame = None  # decompressobj of the frame being read; None between frames
        self.pending = memoryview(b"")
        self.empty = True  # no byte read yet

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.pending:
            leftover = b""
            if self.frame is not None and self.frame.eof:
                leftover, self.frame = self.frame.unused_data, None
            data = leftover or self.raw.read(self.read_size)
            if not data:
                if self.frame is not None:
                    raise zstandard.ZstdError("the file ends inside a zstd frame (truncated?)")
                if self.empty:
                    raise zstandard.ZstdError("the file is empty, with no zstd frame (a failed download?)")
                return 0
            self.empty = False
            if self.frame is None:
                self.frame = self.decompressor.decompressobj()
            self.pending = memoryview(self.frame.decompress(data))
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n


def read_records(path: Path, report: Report) -> Iterator[Tuple[int, dict]]:
    """(line or item number, object) for every JSON object of a JSON file: a JSON array (a `.json` file whose first
    non-space byte is "[") or JSON lines (any other file, `.zst` ones decompressed)."""
    if suffix_of(path, [JSON_SUFFIX]) == JSON_SUFFIX and first_non_space_byte(path) == b"[":
        yield from read_json_array(path, report)
    else:
        yield from read_jsonl(path, report)


def first_non_space_byte(path: Path) -> bytes:
    """The file's first byte that is not whitespace; b"" for a blank or unreadable file (read_jsonl reports it)."""
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 16):
                if block.strip():
                    return block.strip()[:1]
    except OSError:
        pass
    return b""


def read_json_array(path: Path, report: Report) -> Iterator[Tuple[int, dict]]:
    """(item number, object) for every object of a file holding one JSON array, read whole (as Alpaca's files)."""
    try:
        items = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError) as error:
        report.unreadable(path, f"unreadable ({error})")
        return
    except json.JSONDecodeError as error:
        report.unreadable(path, f"malformed JSON array ({error.msg} at line {error.lineno} column {error.colno})")
        return
    for number, item in enumerate(items, 1):
        if not isinstance(item, dict):
            report.skip(path, number, f"array item {number} is a {type(item).__name__}, expected a JSON object")
            continue
        yield number, item


def read_jsonl(path: Path, report: Report) -> Iterator[Tuple[int, dict]]:
    """(line number, object) for every well-formed line of a JSON lines file, decompressed if its name ends in `.zst`
    (in any case), streamed line by line. Lines are parsed from bytes, so invalid UTF-8 costs only its own line; blank
    lines are ignored."""
    line_number = 0
    try:
        with open(path, "rb") as raw:
            lines = io.BufferedReader(ZstdReader(raw), 1 << 20) if path.name.lower().endswith(".zst") else raw
            for line_number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except UnicodeDecodeError as error:
                    report.skip(path, line_number, f"invalid UTF-8 (byte {error.start} of the line)")
                    continue
                except json.JSONDecodeError as error:
                    report.skip(path, line_number, f"malformed JSON ({error.msg} at column {error.colno})")
                    continue
                if not isinstance(record, dict):
                    report.skip(path, line_number, f"expected a JSON object, got {type(record).__name__}")
                    continue
                yield line_number, record
    except (OSError, zstandard.ZstdError) as error:
        report.unreadable(path, f"unreadable after line {line_number} ({error}); the lines before it were used")


def read_whole_file(path: Path, report: Report) -> Iterator[Tuple[int, str]]:
    """The whole file as one document `(1, text)`; nothing (recorded in `report`) if it is unreadable or not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as error:
        report.unreadable(path, str(error))
        return
    try:
        yield 1, data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        report.skip(path, line, f"invalid UTF-8 at byte {error.start} of the file; document skipped")


def read_text_documents(path: Path, report: Report, text_key: str = "text") -> Iterator[Tuple[int, str]]:
    """Every record's `text_key` field of a JSON file (read_records), or the whole of any other file (plain text,
    code)."""
    if suffix_of(path, (*JSON_LINES_SUFFIXES, JSON_SUFFIX)):
        for line, record in read_records(path, report):
            text = record.get(text_key)
            if not isinstance(text, str):
                report.skip(path, line, f"no string {text_key!r} field (--text_key)")
                continue
            yield line, text
    else:
        yield from read_whole_file(path, report)


def read_parquet_documents(path: Path, report: Report, languages: Sequence[str] = ()) -> Iterator[Tuple[int, str]]:
    """The `content` of each row, one row group at a time (memory bounded by the row group, whatever the file
    size). With `languages`, rows of a file outside a language directory are selected by their `lang` column."""
    import pyarrow as pa  # pip install pyarrow; only the parquet inputs need it
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as error:
        report.unreadable(path, f"not a readable parquet file ({error})")
        return
    schema = parquet.schema_arrow
    if PARQUET_TEXT_COLUMN not in schema.names:
        report.unreadable(path, f"no {PARQUET_TEXT_COLUMN!r} column (columns: {schema.names})")
        return
    text_type = schema.field(PARQUET_TEXT_COLUMN).type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        report.unreadable(path, f"column {PARQUET_TEXT_COLUMN!r} holds {text_type}, expected strings")
        return
    by_column = bool(languages) and path.parent.name not in languages
    if by_column and PARQUET_LANGUAGE_COLUMN not in schema.names:
        report.unreadable(path, f"no {PARQUET_LANGUAGE_COLUMN!r} column (nor a language directory) to select "
                                f"{list(languages)}")
        return
    columns = [PARQUET_TEXT_COLUMN, PARQUET_LANGUAGE_COLUMN] if by_column else [PARQUET_TEXT_COLUMN]
    row = 0
    for group in range(parquet.num_row_groups):
        try:
            table = parquet.read_row_group(group, columns=columns)
        except (OSError, pa.ArrowException) as error:
            report.unreadable(path, f"row group {group} is unreadable ({error}); the {row} rows before it were used")
            return
        texts = table.column(PARQUET_TEXT_COLUMN).to_pylist()
        row_languages = table.column(PARQUET_LANGUAGE_COLUMN).to_pylist() if by_column else None
        for i, text in enumerate(texts):
            if row_languages is not None and row_languages[i] not in languages:
                report.excluded[str(row_languages[i])] += 1
                continue
            yield row + i, text or ""  # a null counts as an empty document
        row += len(texts)


def sample_documents(
    files: List[Path], read_documents: ReadDocuments, max_characters: int, report: Report
) -> Iterator[str]:
    """Documents from every file in turn, each file given an equal share of what is left of max_characters (so the
    sample covers the whole corpus, deterministically); a document is cut where its file's share runs out."""
    used = 0
    for i, path in enumerate(files):
        budget = (max_characters - used) // (len(files) - i)
        taken = 0
        for _, text in read_documents(path, report):
            text = text[: budget - taken]
            taken += len(text)
            yield text
            if taken >= budget:
                break
        used += taken


def hashed_split(key: str, validation_fraction: float) -> str:
    """'validation' for a stable `validation_fraction` of keys, else 'train', chosen by a hash of `key` (by default a
    document's text: duplicates land in the same split, and the split depends on neither file order nor process
    count)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return "validation" if int.from_bytes(digest, "little") < validation_fraction * 2**64 else "train"


def load_tokenizer(
    tokenizer_path: Path, bos: bool, eos: bool, dtype: Optional[TokenDtype]
) -> Tuple[Tokenizer, np.dtype]:
    """The tokenizer, checked to have the separators asked for and a vocabulary that fits the token dtype."""
    tokenizer = Tokenizer(tokenizer_path)
    for wanted, name, token_id in ((bos, "bos", tokenizer.bos_id), (eos, "eos", tokenizer.eos_id)):
        if wanted and token_id is None:
            raise ValueError(f"{tokenizer.path} defines no {name.upper()} token; pass --no-{name} to pack without it")
    if dtype is not None and dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {dtype!r}")
    try:  # the shard writer's own check, here to fail before any process starts and to name the file
        return tokenizer, token_dtype(tokenizer.vocab_size, dtype)
    except ValueError as error:
        raise ValueError(f"{tokenizer.path}: {error}") from None


def is_encodable(text: str) -> bool:
    """False for text with lone surrogates ("\\ud800", possible in JSON), which no tokenizer can take."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


@dataclass
class Job:
    """Everything a packing process needs (picklable, sent to each process)."""

    read_documents: ReadDocuments
    tokenizer_path: Path
    destination: Path
    name: str  # shards are {split}_{name}_{process}_{counter}.bin
    split: Optional[str]  # every document goes to this split; None: hashed_split with validation_fraction
    validation_fraction: float = 0.0
    split_key: Optional[SplitKey] = None  # what hashed_split hashes, from (file, document); None: the document
    split_subdirs: bool = False  # shards in destination/{split}/ instead of destination/
    chunk_size: int = DEFAULT_CHUNK_SIZE
    bos: bool = True
    eos: bool = True
    strict: bool = False
    dtype: Optional[TokenDtype] = None

    @property
    def splits(self) -> Tuple[str, ...]:
        return (self.split,) if self.split else ("train", "validation")

    @property
    def label(self) -> str:
        return f"{self.split}_{self.name}" if self.split else self.name

    def outdir(self, split: str) -> Path:
        return self.destination / split if self.split_subdirs else self.destination

    def shards_on_disk(self, temporaries: bool = False) -> List[Path]:
        """This job's shards; with temporaries=True also the temporary files of shards being written (atomic_write's
        `.{shard}.*.tmp`, left behind by a killed process)."""
        found = []
        for split in self.splits:
            pattern = f"{split}_{self.name}_[0-9]*.bin"
            found += self.outdir(split).glob(pattern)
            if temporaries:
                found += self.outdir(split).glob(f".{pattern}.*.tmp")
        return sorted(found)


_progress_queue = None  # set in each worker process by _init_worker
_stop_event = None


def _init_worker(progress_queue, stop_event) -> None:
    global _progress_queue, _stop_event
    _progress_queue, _stop_event = progress_queue, stop_event


def _pack(job: Job, rank: int, files: List[Path], progress: Optional[Callable[[int], None]] = None) -> Report:
    """One process: read, encode and pack `files` in order, with one builder per split."""
    start, cpu_start = time.perf_counter(), time.process_time()
    tokenizer, shard_dtype = load_tokenizer(job.tokenizer_path, job.bos, job.eos, job.dtype)
    report = Report(strict=job.strict)
    builders: Dict[str, PackedDatasetBuilder] = {}
    pending: Dict[str, List[int]] = {split: [] for split in job.splits}

    def flush(split: str) -> None:
        if split not in builders:
            builders[split] = PackedDatasetBuilder(
                job.outdir(split), f"{split}_{job.name}_{rank}", job.chunk_size, tokenizer.vocab_size, shard_dtype
            )
        builders[split].add_array(np.array(pending[split], dtype=shard_dtype))
        pending[split] = []

    for path in files:
        for line, text in job.read_documents(path, report):
            if not text or text.isspace():  # (text.strip() would copy every document)
                report.empty_documents += 1
                continue
            try:
                ids = tokenizer.encode(text, bos=job.bos, eos=job.eos)  # the document boundary: BOS ... EOS
            except (UnicodeEncodeError, RuntimeError):
                if is_encodable(text):
                    raise
                report.skip(path, line, "text is not valid Unicode (a lone surrogate); document skipped")
                continue
            key = job.split_key(path, text) if job.split_key else text
            split = job.split or hashed_split(key, job.validation_fraction)
            report.documents[split] += 1
            report.tokens[split] += len(ids)
            report.characters += len(text)
            pending[split].extend(ids)
            if len(pending[split]) >= FLUSH_TOKENS:
                flush(split)
        size = path.stat().st_size
        report.input_files += 1
        report.input_bytes += size
        if _progress_queue is not None:
            _progress_queue.put(size)
        elif progress is not None:
            progress(size)
        if _stop_event is not None and _stop_event.is_set():  # another process failed: stop early
            break
    for split in job.splits:
        if pending[split]:
            flush(split)
        if split in builders:
            report.shards += [str(f) for f in builders[split].finish()]
            report.max_token_id = max(report.max_token_id, builders[split].max_token_id)
    report.seconds = time.perf_counter() - start
    report.cpu_seconds = time.process_time() - cpu_start
    report.peak_memory_mb = peak_memory_mb()
    return report


def peak_memory_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM counts this program only; getrusage's maxrss (the fallback
    elsewhere) also counts what the parent process held when it started this one (the fork before exec)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024  # in KiB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux and the BSDs


def prepare_files(
    files: List[Path], read_documents: ReadDocuments, *, name: str, split: Optional[str], tokenizer_path: Path,
    destination_path: Path, chunk_size: int, num_processes: Optional[int], strict: bool, bos: bool, eos: bool,
    dtype: Optional[TokenDtype], validation_fraction: float = 0.0, unknown_files: int = 0,
) -> Report:
    """What the command-line preparers share: their Job from `read_documents` and their common arguments (named
    as on their command lines), run by `prepare` over `files`."""
    job = Job(read_documents=read_documents, tokenizer_path=Path(tokenizer_path), destination=Path(destination_path),
              name=name, split=split, validation_fraction=validation_fraction, chunk_size=chunk_size, bos=bos, eos=eos,
              strict=strict, dtype=dtype)
    return prepare(job, files, num_processes, unknown_files=unknown_files)


def prepare(
    job: Job, files: List[Path], num_processes: Optional[int] = None, quiet: bool = False, unknown_files: int = 0
) -> Report:
    """Pack `files` into shards with `num_processes` processes (default: all cores; file i goes to process
    i mod n); print a summary and write it to `{destination}/summary_{label}.json`: summary_{name}.json for a run that
    splits its documents itself, summary_{split}_{name}.json for a run of one split (so the train and validation runs
    of a data set into one directory keep a summary each). Last, it writes `manifest_{label}.json` next to the shards
    (in each split directory with split_subdirs), which training requires: a run killed before that leaves shards
    that training refuses. Refuses to mix with shards of an earlier run, removes this run's shards if it fails (bad
    input under --strict, an error, Ctrl-C or SIGTERM), and raises NothingWrittenError when no document was kept.
    `unknown_files`: the files of other extensions the caller skipped, for the summary."""
    start = time.perf_counter()
    tokenizer, _ = load_tokenizer(job.tokenizer_path, job.bos, job.eos, job.dtype)  # fail here, not in every process
    existing = job.shards_on_disk()
    if existing:
        raise FileExistsError(
            f"{len(existing)} shards from an earlier run are in the destination (e.g. {existing[0]}); "
            f"remove them or choose another destination_path"
        )
    for split in job.splits:  # an earlier run's manifest must not cover what this run writes until it is complete
        (job.outdir(split) / manifest_name(job.label)).unlink(missing_ok=True)
    job.destination.mkdir(parents=True, exist_ok=True)
    n = max(1, min(num_processes or os.cpu_count() or 1, len(files)))
    bar = progress(sum(p.stat().st_size for p in files), job.label, quiet)
    try:
        with sigterm_raises():
            reports = [_pack(job, 0, files, bar.update)] if n == 1 else _pack_in_processes(job, files, n, bar)
    except BaseException as error:  # KeyboardInterrupt and Terminated too: no partial output survives a run
        for path in job.shards_on_disk(temporaries=True):
            path.unlink()
        if not isinstance(error, Exception):
            print(f"\n{job.label}: interrupted ({type(error).__name__}); removed this run's shards", file=sys.stderr)
        raise
    finally:
        bar.close()
    report = Report(unknown_files=unknown_files)
    for process_report in reports:
        report.merge(process_report)
    report.seconds = time.perf_counter() - start
    if not quiet:
        print_summary(job, report, n)
    if not report.shards:
        raise NothingWrittenError(
            f"{job.label}: no document kept from {len(files)} files: {report.skipped} lines or documents skipped,"
            f" {report.unreadable_files} unreadable files, {report.empty_documents} empty and"
            f" {sum(report.excluded.values())} excluded documents; wrote no shards"
            + (f"; the first: {report.problems[0]}" if report.problems else "")
        )
    summary = {"name": job.name, "split": job.split, "processes": n, **report.to_json()}
    summary["shards"] = [os.path.relpath(s, job.destination) for s in report.shards]
    write_json(job.destination / f"summary_{job.label}.json", summary)
    tokenizer_sha256 = file_sha256(tokenizer.path)
    for outdir in sorted({Path(shard).parent for shard in report.shards}):
        write_manifest(outdir, [s for s in report.shards if Path(s).parent == outdir], name=manifest_name(job.label),
                       max_token_id=report.max_token_id, vocab_size=tokenizer.vocab_size,
                       tokenizer_sha256=tokenizer_sha256)
    return report


def progress(total_bytes: int, label: str, quiet: bool) -> "ProgressLines | tqdm":
    """tqdm's bar on a terminal; elsewhere (a log file, a pipe, CI), where its carriage-return updates would make one
    long line, a plain line now and then."""
    if quiet or sys.stderr.isatty():
        return tqdm(total=total_bytes, unit="B", unit_scale=True, desc=label, disable=quiet)
    return ProgressLines(total_bytes, label)


class ProgressLines:
    """`label: 41% of 12.1 MB, 3 s` on stderr at most every `interval` seconds; the caller prints the summary."""

    def __init__(self, total_bytes: int, label: str, interval: float = 10.0):
        self.total, self.label, self.interval = total_bytes, label, interval
        self.done, self.start = 0, time.monotonic()
        self.last = self.start

    def update(self, n_bytes: int) -> None:
        self.done += n_bytes
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            share = self.done / self.total if self.total else 1.0
            print(f"{self.label}: {share:.0%} of {self.total / 1e6:.1f} MB, {now - self.start:.0f} s", file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        pass


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated in the main thread (else it would end the process at once, with no
    cleanup); the previous handler is restored after it. Elsewhere than in the main thread, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _pack_in_processes(job: Job, files: List[Path], n: int, bar: "ProgressLines | tqdm") -> List[Report]:
    context = get_context("spawn")  # a fresh interpreter per process: no inherited threads or memory
    progress_queue, stop_event = context.Queue(), context.Event()
    with ProcessPoolExecutor(n, context, initializer=_init_worker, initargs=(progress_queue, stop_event)) as pool:
        futures = [pool.submit(_pack, job, rank, files[rank::n]) for rank in range(n)]
        try:
            while not all(f.done() for f in futures) or not progress_queue.empty():
                try:
                    bar.update(progress_queue.get(timeout=0.1))
                except queue.Empty:
                    pass
                if any(f.done() and f.exception() is not None for f in futures):
                    stop_event.set()
                    break
            return [f.result() for f in futures]  # raises the first failure, after every process has stopped
        except BaseException:  # Ctrl-C, SIGTERM or a failure: stop the packing processes now, not after their files
            for process in list(pool._processes.values()):  # (Python 3.14 has pool.terminate_workers())
                process.terminate()
            for process in list(pool._processes.values()):
                process.join()
            raise


def print_summary(job: Job, report: Report, processes: int) -> None:
    where = f"{job.destination}/{{{','.join(job.splits)}}}" if job.split_subdirs else str(job.destination)
    by_set = f" {dict(report.excluded)}" if report.excluded else ""
    lines = [
        f"{job.label}: {report.input_files} files ({report.input_bytes / 1e6:,.1f} MB) in {report.seconds:.1f} s"
        f" ({report.cpu_seconds:.1f} CPU s) with {processes} process{'es' if processes > 1 else ''},"
        f" peak memory {report.peak_memory_mb:,.0f} MB per process",
        *(f"  {split:<10} {report.documents[split]:>14,} documents {report.tokens[split]:>16,} tokens"
          for split in job.splits),
        f"  excluded   {sum(report.excluded.values()):>14,} documents{by_set}",
        f"  empty      {report.empty_documents:>14,} documents (not written)",
        f"  skipped    {report.skipped:>14,} malformed lines or undecodable documents",
        f"  unreadable {report.unreadable_files:>14,} files",
        *([f"  unknown    {report.unknown_files:>14,} files of other extensions"] if report.unknown_files else []),
        f"  wrote {len(report.shards):,} shards to {where}",
    ]
    if report.problems:
        lines.append(f"  problems (first {MAX_LISTED_PROBLEMS} skipped lines per process, every unreadable file):")
        lines += [f"    {problem}" for problem in report.problems]
    print("\n".join(lines))
