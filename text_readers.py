"""Reading documents for data preparation: finding the input files and each machine's share of them (`node_files`:
balanced by size, the same on every node that lists the same files, so the nodes need not talk to each other), the
readers of JSON (lines or an array, plain or zstd-compressed), whole text files and parquet files, with every bad line
or file counted and listed in a `Report` instead of ending the run; the deterministic train/validation split of
documents and the document sample a tokenizer is trained on; and the Python standard library's files, the real text
every machine has (the demo corpora).

A reader is a `read_documents(path, report)` generator that yields `(line, text)` for each document of one input file
(line: the line or row number, for messages). shard_packing.py packs what it yields. Imports no torch.
"""

import glob
import hashlib
import heapq
import io
import json
import os
import sysconfig
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import zstandard

from utils import UserError

MAX_LISTED_PROBLEMS = 20  # skipped lines listed in the summary per process (all are counted)
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


class BadInputError(UserError):
    """Bad input seen with --strict: the run is refused."""


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
    resumed_files: int = 0  # of input_files, those an interrupted run had finished (see shard_packing's --resume)
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
        for name in ("characters", "empty_documents", "skipped", "unreadable_files", "input_files", "input_bytes",
                     "resumed_files"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.cpu_seconds += other.cpu_seconds
        self.problems += other.problems
        self.shards += other.shards
        self.peak_memory_mb = max(self.peak_memory_mb, other.peak_memory_mb)
        self.max_token_id = max(self.max_token_id, other.max_token_id)

    def to_json(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "strict"}
        return {name: dict(value) if isinstance(value, Counter) else value for name, value in values.items()}

    @classmethod
    def from_json(cls, values: dict, strict: bool = False) -> "Report":
        """The report of `to_json` (or of a summary file, whose other keys are ignored)."""
        report = cls(strict=strict)
        for f in fields(cls):
            if f.name in values and f.name != "strict":
                value = values[f.name]
                setattr(report, f.name, Counter(value) if isinstance(value, dict) else value)
        return report


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
        raise UserError(f"{path}: unknown file extension; expected one of {' '.join(suffixes)} (in any case)")
    if not known:
        raise FileNotFoundError(f"No {' or '.join(suffixes)} files in {str(source)!r} ({unknown} other files)")
    return known, unknown


# litdata's names for --num_nodes and --node_rank, so that its launch scripts carry over
NODE_VARIABLES = ("DATA_OPTIMIZER_NUM_NODES", "DATA_OPTIMIZER_NODE_RANK")


def resolve_nodes(num_nodes: Optional[int], node_rank: Optional[int]) -> Tuple[int, int]:
    """--num_nodes and --node_rank, else litdata's environment variables (so its launch scripts carry over), else one
    node; checked, naming where each came from."""
    values = []
    for flag, value, variable, default in (("--num_nodes", num_nodes, NODE_VARIABLES[0], 1),
                                           ("--node_rank", node_rank, NODE_VARIABLES[1], 0)):
        source = flag
        if value is None and os.environ.get(variable, "").strip():
            source = f"{flag} (from {variable})"
            try:
                value = int(os.environ[variable])
            except ValueError:
                raise UserError(f"{source} must be an integer, got {os.environ[variable]!r}") from None
        values.append((source, default if value is None else value))
    (nodes_source, nodes), (rank_source, rank) = values
    if nodes < 1:
        raise UserError(f"{nodes_source} must be at least 1, got {nodes}")
    if not 0 <= rank < nodes:
        raise UserError(f"{rank_source} must be in [0, {nodes - 1}] for {nodes} nodes, got {rank}")
    return nodes, rank


def node_files(files: List[Path], num_nodes: int, node_rank: int) -> List[Path]:
    """Node `node_rank`'s share of `files`, in their order: the files, largest first (ties by path), each go to the
    node with the fewest bytes so far (ties: the lowest rank), so the shares differ by at most one file's size and
    every node computes the same split from the same files."""
    if num_nodes == 1:
        return list(files)
    totals = [(0, rank) for rank in range(num_nodes)]  # a heap of (bytes so far, node)
    mine = set()
    for size, path in sorted(((path.stat().st_size, path) for path in files), key=lambda item: (-item[0], item[1])):
        total, node = heapq.heappop(totals)
        heapq.heappush(totals, (total + size, node))
        if node == node_rank:
            mine.add(path)
    if not mine:
        raise UserError(f"--num_nodes {num_nodes}: {len(files)} input files leave node {node_rank} none; use at most "
                        f"{len(files)} nodes")
    return [path for path in files if path in mine]


def inputs_sha256(files: List[Path]) -> str:
    """Of the input files' names (relative to their common directory, which may be mounted elsewhere on another
    node) and sizes: the nodes of one run must agree on it, or their shares overlap or leave files out."""
    root = os.path.commonpath([str(path.parent) for path in files])
    listing = "".join(f"{os.path.relpath(path, root)}\t{path.stat().st_size}\n" for path in files)
    return hashlib.sha256(listing.encode("utf-8", "surrogateescape")).hexdigest()


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


def is_encodable(text: str) -> bool:
    """False for text with lone surrogates ("\\ud800", possible in JSON), which no tokenizer can take."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


# The standard library's source files: real Python code on every machine, their docstrings real English prose
STDLIB = Path(sysconfig.get_paths()["stdlib"])
EXCLUDED_DIRECTORIES = {"test", "tests", "idle_test", "site-packages", "dist-packages"}


def stdlib_files(max_files: Optional[int] = None) -> List[Path]:
    files = []
    for directory, subdirectories, names in os.walk(STDLIB):
        # pruned in place, so the walk never enters site-packages (torch alone holds thousands of files)
        subdirectories[:] = [d for d in subdirectories if d not in EXCLUDED_DIRECTORIES]
        files += [Path(directory, name) for name in names if name.endswith(".py") and not name.startswith("test_")]
    files.sort()
    if not files:
        raise FileNotFoundError(f"No standard library .py files in {str(STDLIB)!r}")
    return files[:max_files]
