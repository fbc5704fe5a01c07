"""Throughput of the full preparer path (read .jsonl.zst + parse + encode + pack + write) against the bare tokenizer.

    python bench/prepare_throughput.py

Builds a synthetic SlimPajama tree from the Python standard library's source files (the demo corpus text, no
download) at two sizes, runs prepare_data/prepare_slimpajama.py on each with one process and with all cores, and
times sentencepiece's own encode of the same documents in this process (each the best of REPEATS runs, as the
machine may be shared). Reports:
- text MB/s and tokens/s of each run, and the peak resident memory of a packing process (Linux VmHWM): the
  same at both sizes, it does not grow with the input;
- the one-process overhead over the bare encode, in wall and CPU time, and as profiled: the share of the packing
  time spent inside sentencepiece's Encode in one cProfile'd run (which a busy machine does not skew);
- scaling: the rate between the two sizes (extra tokens over extra seconds, which leaves out the fixed cost of
  starting worker processes) with one process and with all cores, and the CPU time each spends packing;
- worker start-up: the wall time for a fresh interpreter (what a spawned packing process is) to import what a
  packing process imports, and its resident memory then; with `--before DIR`, the same for another checkout (e.g.
  `git archive HEAD | tar -x -C /tmp/before` before a change), measured in turn with this one.
"""

import contextlib
import cProfile
import io
import json
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Tuple

import sentencepiece as spm
import zstandard

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import cpu_model  # noqa: E402
from prepare_data.prepare_slimpajama import main as prepare_slimpajama  # noqa: E402
from prepare_data.train_tokenizer import main as train_tokenizer  # noqa: E402
from text_readers import stdlib_files  # noqa: E402

VOCAB_SIZE = 32000  # Llama-2's size, for a realistic encode cost
SIZES_MB = (4, 16)  # of text
FILES = 8  # .jsonl.zst files per tree
REPEATS = 3
STARTUP_REPEATS = 7
# what a packing process of prepare_slimpajama.py imports: the script (run as __mp_main__ by spawn) and the
# tokenizer's backend, which tokenizer.py imports when the process loads the tokenizer
WORKER_IMPORTS = "import prepare_data.prepare_slimpajama, sentencepiece"


def write_tree(root: Path, documents: List[str], megabytes: float) -> List[str]:
    """`{root}/train/chunk1/*.jsonl.zst` holding documents (cycled) up to `megabytes` of UTF-8 text; returns them."""
    chosen, size, i = [], 0, 0
    while size < megabytes * 1e6:
        text = documents[i % len(documents)]
        chosen.append(text)
        size += len(text.encode())
        i += 1
    directory = root / "train" / "chunk1"
    directory.mkdir(parents=True)
    per_file = -(-len(chosen) // FILES)
    compressor = zstandard.ZstdCompressor(level=3)
    for f in range(FILES):
        part = chosen[f * per_file : (f + 1) * per_file]
        lines = (json.dumps({"text": t, "meta": {"redpajama_set_name": "RedPajamaCommonCrawl"}}) for t in part)
        (directory / f"example_train_{f}.jsonl.zst").write_bytes(compressor.compress("\n".join(lines).encode() + b"\n"))
    return chosen


def run_preparer(source: Path, tokenizer_path: Path, destination: Path, processes: int) -> dict:
    """The command-line preparer in a fresh process; its summary (seconds exclude interpreter start-up)."""
    command = [
        sys.executable, str(ROOT / "prepare_data" / "prepare_slimpajama.py"), "--source_path", str(source),
        "--tokenizer_path", str(tokenizer_path), "--destination_path", str(destination),
        "--num_processes", str(processes), "--exclude_sets", "",
    ]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    summary = json.loads((destination / "summary_train_slimpajama.json").read_text())
    shutil.rmtree(destination)
    return summary


def bare_encode_seconds(tokenizer_path: Path, documents: List[str]) -> Tuple[float, float]:
    """Wall and CPU seconds of sentencepiece's encode of every document, one call each (as the preparer makes)."""
    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    start, cpu_start = time.perf_counter(), time.process_time()
    for text in documents:
        processor.encode(text)
    return time.perf_counter() - start, time.process_time() - cpu_start


def encode_share(source: Path, tokenizer_path: Path, destination: Path) -> float:
    """The share of a one-process preparer run (in this process, under cProfile) spent in sentencepiece's Encode."""
    profiler = cProfile.Profile()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        profiler.runcall(prepare_slimpajama, source, tokenizer_path, destination, num_processes=1, exclude_sets=())
    shutil.rmtree(destination)
    cumulative = {name: ct for (path, _, name), (_, _, _, ct, _) in pstats.Stats(profiler).stats.items()
                  if name in ("main", "Encode") and ("sentencepiece" in path or "prepare_slimpajama" in path)}
    return cumulative["Encode"] / cumulative["main"]


def worker_startup(root: Path) -> Tuple[List[float], float]:
    """Wall seconds of each of STARTUP_REPEATS fresh interpreters that import WORKER_IMPORTS from the checkout `root`,
    and the peak resident memory (MB) of the last one once they are imported."""
    # VmHWM, not getrusage's maxrss, which would count this process's memory too (see common.peak_memory_mb)
    code = f"{WORKER_IMPORTS}\nprint(next(line.split()[1] for line in open('/proc/self/status') if 'VmHWM' in line))"
    seconds = []
    for _ in range(STARTUP_REPEATS):
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", code], cwd=root, check=True, capture_output=True, text=True)
        seconds.append(time.perf_counter() - start)
    return seconds, int(result.stdout) / 1024  # Linux reports KiB


def print_startup(roots: List[Path]) -> None:
    """worker_startup of each checkout, the checkouts taking turns (a busy moment slows all of them)."""
    seconds: dict = {root: [] for root in roots}
    rss = {}
    for _ in range(REPEATS):
        for root in roots:
            times, rss[root] = worker_startup(root)
            seconds[root] += times
    medians = {root: statistics.median(times) for root, times in seconds.items()}
    for root, times in seconds.items():
        print(f"worker start-up, {root}: median {medians[root]:.3f} s, best {min(times):.3f} s of {len(times)}; "
              f"{rss[root]:,.0f} MB resident after the imports")
    if len(roots) == 2:
        print(f"worker start-up of {roots[1]} over {roots[0]}: {medians[roots[1]] / medians[roots[0]]:.1f}x")


def main(tokenizer_path: Optional[Path] = None, workdir: Optional[Path] = None, before: Optional[Path] = None) -> None:
    cores = os.cpu_count() or 1
    print(f"device: {cpu_model()}, {cores} cores (os.cpu_count), Python {platform.python_version()}, "
          f"sentencepiece {spm.__version__}; load average at start {os.getloadavg()[0]:.1f}")
    print_startup([ROOT] if before is None else [ROOT, before.resolve()])
    documents = [text for path in stdlib_files() if (text := path.read_text(encoding="utf-8")).strip()]
    # both sizes cycle through the same documents, so that only the input size differs (peak memory follows the
    # longest document, not the input size)
    base = documents[::7]
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        if tokenizer_path is None:
            text_dir = tmp / "tokenizer_text"  # the documents in order, one file each, for the script's reader
            text_dir.mkdir()
            for i, text in enumerate(documents):
                (text_dir / f"{i:05d}.txt").write_text(text, encoding="utf-8")
            tokenizer_path = train_tokenizer(str(text_dir), tmp / "tokenizer", VOCAB_SIZE)
            print(f"tokenizer: sentencepiece BPE, {VOCAB_SIZE} tokens, trained on the same text")
        else:
            print(f"tokenizer: {tokenizer_path}")
        print(f"{'text':>8}  {'run':<28} {'seconds':>8} {'CPU s':>7} {'text MB/s':>10} {'tokens/s':>11} "
              f"{'peak RSS/process':>17}")
        processes = sorted({1, cores})
        results = {}  # (megabytes, processes) -> summary
        for megabytes in SIZES_MB:
            source = tmp / f"slimpajama_{megabytes}"
            chosen = write_tree(source, base, megabytes)
            text_mb = sum(len(t.encode()) for t in chosen) / 1e6
            bare_runs, preparer_runs = [], {n: [] for n in processes}
            for _ in range(REPEATS):  # interleaved, so that a busy moment of the machine slows all of them
                bare_runs.append(bare_encode_seconds(tokenizer_path, chosen))
                for n in processes:
                    preparer_runs[n].append(run_preparer(source, tokenizer_path, tmp / "out", n))
            bare, bare_cpu = min(bare_runs)
            tokens = preparer_runs[1][0]["tokens"]["train"]
            text_tokens = tokens - 2 * preparer_runs[1][0]["documents"]["train"]  # without the BOS/EOS added
            print(f"{text_mb:>6.1f}MB  {'bare sentencepiece encode':<28} {bare:>8.2f} {bare_cpu:>7.2f} "
                  f"{text_mb / bare:>10.2f} {text_tokens / bare:>11,.0f}")
            for n, summaries in preparer_runs.items():
                best = results[megabytes, n] = min(summaries, key=lambda summary: summary["seconds"])
                label = f"preparer, {n} process" + ("es" if n > 1 else "")
                print(f"{text_mb:>6.1f}MB  {label:<28} {best['seconds']:>8.2f} {best['cpu_seconds']:>7.2f} "
                      f"{text_mb / best['seconds']:>10.2f} {tokens / best['seconds']:>11,.0f} "
                      f"{best['peak_memory_mb']:>14,.0f} MB")
            one = results[megabytes, 1]
            print(f"{'':>8}  one-process overhead over the bare encode: {one['seconds'] / bare - 1:+.1%} wall time, "
                  f"{one['cpu_seconds'] / bare_cpu - 1:+.1%} CPU time")
        share = encode_share(source, tokenizer_path, tmp / "profiled")
        print(f"profiled ({SIZES_MB[-1]} MB, 1 process): {share:.1%} of the time in sentencepiece's Encode, so "
              f"reading, parsing, packing and writing add {1 / share - 1:.1%} to the tokenizer's own time")
        small, large = SIZES_MB
        rates = {}  # extra tokens over extra seconds
        for n in processes:
            extra_tokens = results[large, n]["tokens"]["train"] - results[small, n]["tokens"]["train"]
            rates[n] = extra_tokens / (results[large, n]["seconds"] - results[small, n]["seconds"])
        print(f"rate between {small} MB and {large} MB (start-up excluded): "
              + ", ".join(f"{n} process{'es' if n > 1 else ''} {rates[n]:,.0f} tokens/s" for n in processes)
              + f"; scaling {rates[cores] / rates[1]:.2f}x with {cores} processes; packing CPU time "
              f"{results[large, cores]['cpu_seconds'] / results[large, 1]['cpu_seconds']:.2f}x that of one process")
        print(f"load average at the end {os.getloadavg()[0]:.1f} (other work on the machine slows the parallel runs)")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], argument_default=argparse.SUPPRESS)
    parser.add_argument("--tokenizer_path", type=Path, help="default: train a 32k BPE tokenizer on the corpus")
    parser.add_argument("--workdir", type=Path, help="where the temporary corpus and shards go (default: $TMPDIR)")
    parser.add_argument("--before", type=Path, help="another checkout whose worker start-up to measure in turn")
    main(**vars(parser.parse_args()))
