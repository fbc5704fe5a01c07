"""Packing documents into token shards: the process pool that reads each input file with a preparer's reader
(text_readers.py), encodes every document with BOS/EOS separators and packs the ids with one PackedDatasetBuilder per
process (shard_format.py), shows progress, prints a summary, writes it as JSON next to the shards, and last the run's
manifest.

Several machines: node R of N (`--num_nodes`, `--node_rank`, or litdata's DATA_OPTIMIZER_NUM_NODES and
DATA_OPTIMIZER_NODE_RANK) packs its share of the input files (`node_files`: balanced by size, the same split on every
node), into shards, a summary and a manifest whose names carry the node, so that nodes writing into one shared
directory never collide; training reads the union and refuses a set with a node missing (packed_dataset.py).

Interruptions. An error, Ctrl-C or SIGTERM stops the processes and removes the run's shards. With --resume they are
kept instead, and the run continues where it stopped: every process records its position after a finished input
file (at most every RECORD_SECONDS) in a journal, `.journal_{run}_{process}.json`: how many of its files are done,
each split's complete shards, how many tokens of the open chunk belong to those files (the builder has made them
durable, see PackedDatasetBuilder.sync) and its counts so far. A resumed process truncates its shards to that point
and goes on with the next file, so a kill loses the files being read (and those finished since the last record), and
the shards are byte-identical to an uninterrupted run's.

Imports no torch (nor anything that does), so each packing process starts in a fraction of a second.
"""

import os
import hashlib
import queue
import resource
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Literal, Optional, Tuple, get_args

import numpy as np
from tqdm import tqdm

from shard_format import PackedDatasetBuilder, file_sha256, manifest_name, token_dtype, write_manifest
from text_readers import (
    MAX_LISTED_PROBLEMS, ReadDocuments, Report, hashed_split, inputs_sha256, is_encodable, node_files, resolve_nodes,
)
from tokenizer import Tokenizer
from utils import UserError, read_json, write_json

DEFAULT_CHUNK_SIZE = (2048 + 1) * 1024  # tokens per shard, as TinyLlama
FLUSH_TOKENS = 1 << 18  # ids are handed to the builder in arrays of about this many tokens
TokenDtype = Literal["uint16", "int32"]  # of the shards' token ids: the preparers' `dtype` parameter
DTYPE_CHOICES = get_args(TokenDtype)  # checked at run time too, for callers from Python
SplitKey = Callable[[Path, str], str]
RECORD_SECONDS = 1.0  # a process records its position after a finished file at most this often (two fsyncs each)
DISK_MARGIN = 1.1  # the shards' size is estimated from one input file: ask for 10% more free space
SAMPLE_CHARACTERS = 1 << 18  # of text encoded for that estimate: about 0.07 s


class NothingWrittenError(UserError):
    """A run that read its files but kept no document: a wrong --text_key, or nothing but bad input."""


class Terminated(SystemExit):
    """SIGTERM, raised in the main process while `prepare` runs so that its cleanup runs; exits with status 143."""


def load_tokenizer(
    tokenizer_path: Path, bos: bool, eos: bool, dtype: Optional[TokenDtype]
) -> Tuple[Tokenizer, np.dtype]:
    """The tokenizer, checked to have the separators asked for and a vocabulary that fits the token dtype."""
    tokenizer = Tokenizer(tokenizer_path)
    for wanted, name, token_id in ((bos, "bos", tokenizer.bos_id), (eos, "eos", tokenizer.eos_id)):
        if wanted and token_id is None:
            raise UserError(f"{tokenizer.path} defines no {name.upper()} token; pass --no-{name} to pack without it")
    if dtype is not None and dtype not in DTYPE_CHOICES:
        raise UserError(f"--dtype must be one of {DTYPE_CHOICES}, got {dtype!r}")
    try:  # the shard writer's own check, here to fail before any process starts and to name the file
        return tokenizer, token_dtype(tokenizer.vocab_size, dtype)
    except ValueError as error:
        raise UserError(f"{tokenizer.path}: {error}") from None


def check_packing_args(chunk_size: int, num_processes: Optional[int]) -> None:
    """Refuse a shard size or a process count that packs nothing, naming the flag, before any file is read."""
    if chunk_size < 1:
        raise UserError(f"--chunk_size must be at least 1 token, got {chunk_size}")
    if num_processes is not None and num_processes < 1:
        raise UserError(f"--num_processes must be at least 1 (or none: every core), got {num_processes}")


@dataclass
class Job:
    """Everything a packing process needs (picklable, sent to each process)."""

    read_documents: ReadDocuments
    tokenizer_path: Path
    destination: Path
    name: str  # shards are {split}_{name}_{process}_{counter}.bin (see prefix)
    split: Optional[str]  # every document goes to this split; None: hashed_split with validation_fraction
    validation_fraction: float = 0.0
    split_key: Optional[SplitKey] = None  # what hashed_split hashes, from (file, document); None: the document
    split_subdirs: bool = False  # shards in destination/{split}/ instead of destination/
    chunk_size: int = DEFAULT_CHUNK_SIZE
    bos: bool = True
    eos: bool = True
    strict: bool = False
    dtype: Optional[TokenDtype] = None
    num_nodes: int = 1
    node_rank: int = 0
    resume: bool = False  # continue an interrupted run from its journals; keep the progress if this run fails too
    record_seconds: float = RECORD_SECONDS

    @property
    def splits(self) -> Tuple[str, ...]:
        return (self.split,) if self.split else ("train", "validation")

    @property
    def label(self) -> str:
        return f"{self.split}_{self.name}" if self.split else self.name

    @property
    def run(self) -> str:
        """This node's run, which names its summary_{run}.json, manifest_{run}.json and journals."""
        return self.label if self.num_nodes == 1 else f"{self.label}_node{self.node_rank}"

    def prefix(self, split: str, process: str) -> str:
        """Of the shards of a process: {split}_{name}_{process}, or {split}_{name}_node{R}_{process} on several
        nodes. `process` is a number, or a glob pattern."""
        node = "" if self.num_nodes == 1 else f"node{self.node_rank}_"
        return f"{split}_{self.name}_{node}{process}"

    def outdir(self, split: str) -> Path:
        return self.destination / split if self.split_subdirs else self.destination

    def journal(self, process: int) -> Path:
        return self.destination / f".journal_{self.run}_{process}.json"

    def shards_on_disk(self, temporaries: bool = False) -> List[Path]:
        """This node's shards; with temporaries=True also what an unfinished run leaves beside them: the temporary
        files of shards being written (atomic_write's `.{shard}.*.tmp`), the open chunks' `.open` files and the
        processes' journals."""
        found = []
        for split in self.splits:
            pattern = self.prefix(split, "[0-9]*")
            found += self.outdir(split).glob(f"{pattern}.bin")
            if temporaries:
                found += self.outdir(split).glob(f".{pattern}.bin.*.tmp")
                found += self.outdir(split).glob(f".{pattern}.open")
        if temporaries:
            found += self.journals_on_disk()
        return sorted(found)

    def journals_on_disk(self) -> List[Path]:
        """The processes' journals and what a process killed while writing one leaves (atomic_write's `.tmp`)."""
        return sorted([*self.destination.glob(f".journal_{self.run}_[0-9]*.json"),
                       *self.destination.glob(f"..journal_{self.run}_[0-9]*.json.*.tmp")])

    def other_layout(self) -> List[Path]:
        """Shards of this data set from a run on another number of nodes (one, or several), which this run's would be
        mixed with."""
        pattern = f"{self.name}_node[0-9]*_[0-9]*.bin" if self.num_nodes == 1 else f"{self.name}_[0-9]*.bin"
        return sorted(path for split in self.splits for path in self.outdir(split).glob(f"{split}_{pattern}"))


_progress_queue = None  # set in each worker process by _init_worker
_stop_event = None


def _init_worker(progress_queue, stop_event) -> None:
    global _progress_queue, _stop_event
    _progress_queue, _stop_event = progress_queue, stop_event


def _pack(job: Job, rank: int, files: List[Path], identity: dict, journal: Optional[dict],
          progress: Optional[Callable[[int], None]] = None) -> Report:
    """One process: read, encode and pack `files` in order, with one builder per split; with a `journal` of an
    interrupted run, from where it stopped. `identity`: what this process's journals record its position in."""
    start, cpu_start = time.perf_counter(), time.process_time()
    tokenizer, shard_dtype = load_tokenizer(job.tokenizer_path, job.bos, job.eos, job.dtype)
    report, builders, done = _restore(job, rank, journal, tokenizer.vocab_size, shard_dtype)
    pending: Dict[str, List[int]] = {split: [] for split in job.splits}

    def flush(split: str) -> None:
        if split not in builders:
            builders[split] = PackedDatasetBuilder(
                job.outdir(split), job.prefix(split, str(rank)), job.chunk_size, tokenizer.vocab_size, shard_dtype
            )
        builders[split].add_array(np.array(pending[split], dtype=shard_dtype))
        pending[split] = []

    def record(files_done: int) -> None:
        """The position after `files_done` files, durable: their tokens on disk (sync), then the journal."""
        for split in job.splits:
            if pending[split]:
                flush(split)
        positions = {split: [*builder.sync(), builder.max_token_id] for split, builder in builders.items()}
        write_json(job.journal(rank), {**identity, "files_done": files_done, "last_file": str(files[files_done - 1]),
                                       "shards": positions, "report": report.to_json()})

    last_record = time.monotonic()
    for index in range(done, len(files)):
        path = files[index]
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
        if time.monotonic() - last_record >= job.record_seconds:
            record(index + 1)
            last_record = time.monotonic()
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


def _restore(job: Job, rank: int, journal: Optional[dict], vocab_size: int,
             shard_dtype: np.dtype) -> Tuple[Report, Dict[str, PackedDatasetBuilder], int]:
    """A process's report, builders and files done: from its journal, after removing what it wrote past that
    position; with --resume and no journal (killed before its first record), after removing whatever it wrote."""
    if not job.resume:
        return Report(strict=job.strict), {}, 0
    positions = journal["shards"] if journal else {}
    builders = {
        split: PackedDatasetBuilder.resume(job.outdir(split), job.prefix(split, str(rank)), job.chunk_size, vocab_size,
                                           shard_dtype, *positions.get(split, (0, 0, -1)))
        for split in job.splits
    }
    if journal is None:
        return Report(strict=job.strict), builders, 0
    report = Report.from_json(journal["report"], strict=job.strict)
    report.resumed_files = journal["files_done"]
    return report, builders, journal["files_done"]


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
    dtype: Optional[TokenDtype], quiet: bool = False, validation_fraction: float = 0.0, unknown_files: int = 0,
    num_nodes: Optional[int] = None, node_rank: Optional[int] = None, resume: bool = False,
) -> Report:
    """What the command-line preparers share: their Job from `read_documents` and their common arguments (named
    as on their command lines), run by `prepare` over `files` (all nodes' files: prepare takes this node's)."""
    num_nodes, node_rank = resolve_nodes(num_nodes, node_rank)
    job = Job(read_documents=read_documents, tokenizer_path=Path(tokenizer_path), destination=Path(destination_path),
              name=name, split=split, validation_fraction=validation_fraction, chunk_size=chunk_size, bos=bos, eos=eos,
              strict=strict, dtype=dtype, num_nodes=num_nodes, node_rank=node_rank, resume=resume)
    return prepare(job, files, num_processes, quiet=quiet, unknown_files=unknown_files)


def prepare(
    job: Job, files: List[Path], num_processes: Optional[int] = None, quiet: bool = False, unknown_files: int = 0
) -> Report:
    """Pack this node's share of `files` (node_files) into shards with `num_processes` processes (default: all
    cores; file i of the share goes to process i mod n); print a summary and write it to
    `{destination}/summary_{run}.json`: summary_{name}.json for a run that splits its documents itself,
    summary_{split}_{name}.json for a run of one split (so the train and validation runs of a data set into one
    directory keep a summary each), with `_node{R}` added on several nodes. Last, it writes `manifest_{run}.json` next
    to the shards (in each split directory with split_subdirs), which training requires: a run killed before that
    leaves shards that training refuses. Refuses to mix with shards of an earlier run (unless `job.resume`: then it
    continues that run, or returns at once if it is complete) or with those of a run on another number of nodes, and
    to start when the destination lacks the free space the shards need (check_disk_space). Removes this run's shards
    if it fails (bad input under --strict, an error, Ctrl-C or SIGTERM) unless `job.resume`, and raises
    NothingWrittenError when no document was kept. `unknown_files`: the files of other extensions the caller
    skipped, for the summary."""
    start = time.perf_counter()
    check_packing_args(job.chunk_size, num_processes)
    tokenizer, shard_dtype = load_tokenizer(job.tokenizer_path, job.bos, job.eos, job.dtype)  # fail here, not later
    inputs = inputs_sha256(files)
    files = node_files(files, job.num_nodes, job.node_rank)
    complete = completed_run(job, quiet)
    if complete is not None:
        return complete
    refuse_mixing(job)
    tokenizer_sha256 = file_sha256(tokenizer.path)
    n = max(1, min(num_processes or os.cpu_count() or 1, len(files)))
    shares = [files[rank::n] for rank in range(n)]
    identities = [journal_identity(job, n, share, tokenizer_sha256) for share in shares]
    journals = read_journals(job, identities) if job.resume else [None] * n
    for split in job.splits:  # an earlier run's manifest must not cover what this run writes until it is complete
        (job.outdir(split) / manifest_name(job.run)).unlink(missing_ok=True)
    job.destination.mkdir(parents=True, exist_ok=True)
    done = [share[:journal["files_done"]] if journal else [] for share, journal in zip(shares, journals)]
    remaining = [path for share, finished in zip(shares, done) for path in share[len(finished):]]
    check_disk_space(job, remaining, tokenizer, shard_dtype, quiet)
    bar = progress(sum(p.stat().st_size for p in files), job.run, quiet)
    bar.update(sum(p.stat().st_size for finished in done for p in finished))
    try:
        with sigterm_raises():
            reports = ([_pack(job, 0, files, identities[0], journals[0], bar.update)] if n == 1
                       else _pack_in_processes(job, shares, identities, journals, bar))
    except BaseException as error:  # KeyboardInterrupt and Terminated too
        interrupted = not isinstance(error, Exception)
        if job.resume:
            if interrupted:
                print(f"\n{job.run}: interrupted ({type(error).__name__}); its progress is kept: run the same "
                      f"command with --resume to continue", file=sys.stderr)
        else:
            for path in job.shards_on_disk(temporaries=True):
                path.unlink()
            if interrupted:
                print(f"\n{job.run}: interrupted ({type(error).__name__}); removed this run's shards",
                      file=sys.stderr)
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
        for path in job.shards_on_disk(temporaries=True):  # the journals
            path.unlink()
        raise NothingWrittenError(
            f"{job.run}: no document kept from {len(files)} files: {report.skipped} lines or documents skipped,"
            f" {report.unreadable_files} unreadable files, {report.empty_documents} empty and"
            f" {sum(report.excluded.values())} excluded documents; wrote no shards"
            + (f"; the first: {report.problems[0]}" if report.problems else "")
        )
    nodes = {"num_nodes": job.num_nodes, "node_rank": job.node_rank}
    summary = {"name": job.name, "split": job.split, "processes": n, **nodes, **report.to_json()}
    summary["shards"] = [os.path.relpath(s, job.destination) for s in report.shards]
    write_json(job.destination / f"summary_{job.run}.json", summary)
    for outdir in sorted({Path(shard).parent for shard in report.shards}):
        write_manifest(outdir, [s for s in report.shards if Path(s).parent == outdir], name=manifest_name(job.run),
                       max_token_id=report.max_token_id, vocab_size=tokenizer.vocab_size,
                       tokenizer_sha256=tokenizer_sha256, run=job.label, inputs_sha256=inputs, **nodes)
    for path in job.journals_on_disk():  # complete: nothing to resume
        path.unlink(missing_ok=True)
    return report


def completed_run(job: Job, quiet: bool) -> Optional[Report]:
    """With --resume, the report of this node's run if it is complete (its manifest is written last), else None."""
    if not job.resume:
        return None
    manifests = [job.outdir(split) / manifest_name(job.run) for split in job.splits]
    manifest = next((path for path in manifests if path.is_file()), None)
    if manifest is None:
        return None
    summary = read_json(job.destination / f"summary_{job.run}.json", "the summary of a complete preparer run")
    if not quiet:
        print(f"{job.run}: already complete ({manifest}); nothing to do")
    return Report.from_json(summary)


def refuse_mixing(job: Job) -> None:
    """Refuse a destination that holds shards this run's would be mixed with: of a run on another number of nodes,
    or (without --resume) of an earlier run of this node."""
    other = job.other_layout()
    if other:
        runs = "several nodes" if job.num_nodes == 1 else "one node"
        raise UserError(f"{len(other)} shards of {job.label} from a run on {runs} are in the destination (e.g. "
                        f"{other[0]}), which a run with --num_nodes {job.num_nodes} would mix with: remove them or "
                        f"choose another --destination_path")
    existing = job.shards_on_disk(temporaries=True)
    if existing and not job.resume:
        shards = [path for path in existing if path.suffix == ".bin"]
        raise UserError(
            f"{len(shards)} shards and {len(existing) - len(shards)} other files from an earlier run are in the "
            f"destination (e.g. {existing[0]}); remove them or choose another --destination_path, or pass --resume to "
            f"continue that run if it was interrupted"
        )


JOURNAL_FLAGS = {"chunk_size": "--chunk_size", "bos": "--bos", "eos": "--eos", "dtype": "--dtype",
                 "processes": "--num_processes", "num_nodes": "--num_nodes", "tokenizer_sha256": "--tokenizer_path",
                 "validation_fraction": "--validation_fraction", "files": "the input files"}


def journal_identity(job: Job, processes: int, files: List[Path], tokenizer_sha256: str) -> dict:
    """What a process's journal records its position in: resuming with other values would pack something else."""
    listing = "".join(f"{path}\n" for path in files)
    return {"chunk_size": job.chunk_size, "bos": job.bos, "eos": job.eos, "dtype": job.dtype, "processes": processes,
            "num_nodes": job.num_nodes, "tokenizer_sha256": tokenizer_sha256,
            "validation_fraction": job.validation_fraction,
            "files": hashlib.sha256(listing.encode("utf-8", "surrogateescape")).hexdigest()}


def read_journals(job: Job, identities: List[dict]) -> List[Optional[dict]]:
    """Each process's journal, checked to be of a run with the same settings and inputs; None where a process
    recorded nothing. With no journal at all, whatever the interrupted run left is removed: it starts over."""
    journals = []
    for rank, identity in enumerate(identities):
        path = job.journal(rank)
        journal = read_json(path, "a preparer process's journal") if path.is_file() else None
        for key, value in identity.items():
            if journal is not None and journal.get(key) != value:
                raise UserError(f"--resume: {path} was written by a run with another {JOURNAL_FLAGS[key]} "
                                f"({journal.get(key)!r}, now {value!r}): resume with the flags and input files of the "
                                f"interrupted run, or remove its files ({job.prefix('*', '*')}.bin, .journal_"
                                f"{job.run}_*) and start again")
        journals.append(journal)
    if not any(journals):
        for path in job.shards_on_disk(temporaries=True):
            path.unlink()
    return journals


def check_disk_space(job: Job, files: List[Path], tokenizer: Tokenizer, shard_dtype: np.dtype, quiet: bool) -> None:
    """Refuse to start when the destination has less free space than the shards of `files` need, estimated as their
    size x the tokens per byte of the smallest of them x the token width. That file is read here once more, and its
    first SAMPLE_CHARACTERS characters of text encoded (encoding is the costly part)."""
    if not files:
        return
    sample = min(files, key=lambda path: (path.stat().st_size, path))
    documents = characters = sampled_characters = sampled_tokens = 0
    for _, text in job.read_documents(sample, Report()):
        if not text or text.isspace() or not is_encodable(text):
            continue
        documents += 1
        characters += len(text)
        if sampled_characters < SAMPLE_CHARACTERS:
            part = text[:SAMPLE_CHARACTERS - sampled_characters]
            sampled_tokens += len(tokenizer.encode(part, bos=False, eos=False))
            sampled_characters += len(part)
    tokens = characters * sampled_tokens / max(sampled_characters, 1) + documents * (job.bos + job.eos)
    per_byte = tokens / max(sample.stat().st_size, 1)
    input_bytes = sum(path.stat().st_size for path in files)
    needed = input_bytes * per_byte * shard_dtype.itemsize * DISK_MARGIN
    free = shutil.disk_usage(job.destination).free
    how = (f"{input_bytes / 1e9:,.2f} GB of input x {per_byte:.3f} tokens per byte, measured on {sample}, x "
           f"{shard_dtype.itemsize} bytes per token, + {DISK_MARGIN - 1:.0%}")
    if needed > free:
        raise UserError(f"--destination_path {job.destination} has {free / 1e9:,.2f} GB free, but the shards of "
                        f"{len(files)} files need about {needed / 1e9:,.2f} GB ({how}): free some space or choose "
                        f"another --destination_path")
    if job.num_nodes > 1 and needed * job.num_nodes > free and not quiet:
        print(f"{job.run}: the shards of this node need about {needed / 1e9:,.2f} GB ({how}) of the {free / 1e9:,.2f} "
              f"GB free; if --destination_path is shared, all {job.num_nodes} nodes together need about "
              f"{job.num_nodes} times as much", file=sys.stderr)


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


def _pack_in_processes(job: Job, shares: List[List[Path]], identities: List[dict], journals: List[Optional[dict]],
                       bar: "ProgressLines | tqdm") -> List[Report]:
    context = get_context("spawn")  # a fresh interpreter per process: no inherited threads or memory
    progress_queue, stop_event = context.Queue(), context.Event()
    n = len(shares)
    with ProcessPoolExecutor(n, context, initializer=_init_worker, initargs=(progress_queue, stop_event)) as pool:
        futures = [pool.submit(_pack, job, rank, shares[rank], identities[rank], journals[rank]) for rank in range(n)]
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
    nodes = f" (node {job.node_rank} of {job.num_nodes})" if job.num_nodes > 1 else ""
    resumed = f", {report.resumed_files} of them done before the interruption" if report.resumed_files else ""
    lines = [
        f"{job.run}{nodes}: {report.input_files} files ({report.input_bytes / 1e6:,.1f} MB{resumed}) in"
        f" {report.seconds:.1f} s ({report.cpu_seconds:.1f} CPU s) with {processes}"
        f" process{'es' if processes > 1 else ''}, peak memory {report.peak_memory_mb:,.0f} MB per process",
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
