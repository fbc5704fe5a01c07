"""Packing documents into token shards: the process pool that reads each input file with a preparer's reader
(text_readers.py), encodes every document with BOS/EOS separators and packs the ids with one PackedDatasetBuilder per
process (shard_format.py), shows progress, prints a summary, writes it as JSON next to the shards, and last the run's
manifest. An interrupted run (an error, Ctrl-C, SIGTERM) stops its processes and removes its shards.

Imports no torch (nor anything that does), so each packing process starts in a fraction of a second.
"""

import os
import queue
import resource
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
from text_readers import MAX_LISTED_PROBLEMS, ReadDocuments, Report, hashed_split, is_encodable
from tokenizer import Tokenizer
from utils import UserError, write_json

DEFAULT_CHUNK_SIZE = (2048 + 1) * 1024  # tokens per shard, as TinyLlama
FLUSH_TOKENS = 1 << 18  # ids are handed to the builder in arrays of about this many tokens
TokenDtype = Literal["uint16", "int32"]  # of the shards' token ids: the preparers' `dtype` parameter
DTYPE_CHOICES = get_args(TokenDtype)  # checked at run time too, for callers from Python
SplitKey = Callable[[Path, str], str]


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
    dtype: Optional[TokenDtype], quiet: bool = False, validation_fraction: float = 0.0, unknown_files: int = 0,
) -> Report:
    """What the command-line preparers share: their Job from `read_documents` and their common arguments (named
    as on their command lines), run by `prepare` over `files`."""
    job = Job(read_documents=read_documents, tokenizer_path=Path(tokenizer_path), destination=Path(destination_path),
              name=name, split=split, validation_fraction=validation_fraction, chunk_size=chunk_size, bos=bos, eos=eos,
              strict=strict, dtype=dtype)
    return prepare(job, files, num_processes, quiet=quiet, unknown_files=unknown_files)


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
    check_packing_args(job.chunk_size, num_processes)
    tokenizer, _ = load_tokenizer(job.tokenizer_path, job.bos, job.eos, job.dtype)  # fail here, not in every process
    existing = job.shards_on_disk()
    if existing:
        raise UserError(
            f"{len(existing)} shards from an earlier run are in the destination (e.g. {existing[0]}); "
            f"remove them or choose another --destination_path"
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
