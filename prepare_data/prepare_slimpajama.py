"""Tokenize SlimPajama (`{source_path}/{split}/chunk*/*.jsonl.zst`) into shards `{split}_slimpajama_{process}_*.bin`.

    python prepare_data/prepare_slimpajama.py --source_path data/SlimPajama-627B \
        --tokenizer_path checkpoints/TinyLlama-1.1B --destination_path data/slim_star_combined --split train

TinyLlama leaves out SlimPajama's GitHub subset (its code comes from StarCoder); AMD-Llama-135m also leaves out the
books: `--exclude_sets RedPajamaGithub,RedPajamaBook`.
"""

import sys
from functools import partial
from pathlib import Path
from typing import Iterator, Literal, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shard_packing import DEFAULT_CHUNK_SIZE, TokenDtype, prepare_files
from text_readers import Report, find_files, read_records
from utils import UserError, cli

REDPAJAMA_SETS = (
    "RedPajamaCommonCrawl", "RedPajamaC4", "RedPajamaGithub", "RedPajamaBook",
    "RedPajamaArXiv", "RedPajamaWikipedia", "RedPajamaStackExchange",
)  # fmt: skip
DEFAULT_EXCLUDE_SETS = ("RedPajamaGithub",)


def read_documents(path: Path, report: Report, exclude_sets: Sequence[str]) -> Iterator[Tuple[int, str]]:
    """The `text` of each line of a SlimPajama file, unless its `meta.redpajama_set_name` is excluded."""
    for line, record in read_records(path, report):
        text = record.get("text")
        if not isinstance(text, str):
            report.skip(path, line, "no string 'text' field")
            continue
        meta = record.get("meta")
        set_name = meta.get("redpajama_set_name") if isinstance(meta, dict) else None
        if set_name in exclude_sets:
            report.excluded[set_name] += 1
            continue
        yield line, text


def main(
    source_path: Path = Path("data/SlimPajama-627B"),
    tokenizer_path: Path = Path("checkpoints/TinyLlama-1.1B"),
    destination_path: Path = Path("data/slim_star_combined"),
    split: Literal["train", "validation"] = "train",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    num_processes: Optional[int] = None,
    exclude_sets: Sequence[str] = DEFAULT_EXCLUDE_SETS,
    strict: bool = False,
    bos: bool = True,
    eos: bool = True,
    dtype: Optional[TokenDtype] = None,
    quiet: bool = False,
    num_nodes: Optional[int] = None,
    node_rank: Optional[int] = None,
    resume: bool = False,
) -> Report:
    """Tokenize one split of SlimPajama into shards {split}_slimpajama_{process}_*.bin in destination_path.

    Args:
        source_path: the SlimPajama download, with {split}/chunk*/*.jsonl.zst
        tokenizer_path: directory with tokenizer.model, or the file itself
        destination_path: where the shards and summary_{split}_slimpajama.json are written
        split: which split of source_path to tokenize
        chunk_size: tokens per shard
        num_processes: processes that pack the files; none: all cores
        exclude_sets: RedPajama sets left out, e.g. RedPajamaGithub,RedPajamaBook; "" for none
        strict: refuse the run at the first bad line or file (else skip it, counted and reported)
        bos: BOS before each document
        eos: EOS after each document
        dtype: token dtype of the shards; none: uint16 when the vocabulary fits, else int32
        quiet: no progress bar and no summary (the summary file is written all the same)
        num_nodes: machines that share the input files (node_rank packs its share); none: DATA_OPTIMIZER_NUM_NODES or 1
        node_rank: this machine's share, 0 to num_nodes - 1; none: DATA_OPTIMIZER_NODE_RANK or 0
        resume: continue this node's interrupted run in destination_path (else start it), and keep its progress if
            this run fails too
    """
    unknown = sorted(set(exclude_sets) - set(REDPAJAMA_SETS))
    if unknown:
        raise UserError(f"--exclude_sets: unknown set names {unknown}; SlimPajama's sets are {list(REDPAJAMA_SETS)}")
    split_dir = Path(source_path) / split
    if not split_dir.is_dir():
        raise FileNotFoundError(
            f"{str(split_dir)!r} does not exist (expected {source_path}/{split}/chunk*/*.jsonl.zst)"
        )
    files = find_files(split_dir, ["chunk*/*.jsonl.zst"])
    return prepare_files(
        files, partial(read_documents, exclude_sets=tuple(exclude_sets)), name="slimpajama", split=split,
        tokenizer_path=tokenizer_path, destination_path=destination_path, chunk_size=chunk_size,
        num_processes=num_processes, strict=strict, bos=bos, eos=eos, dtype=dtype, quiet=quiet,
        num_nodes=num_nodes, node_rank=node_rank, resume=resume,
    )


if __name__ == "__main__":
    cli(main)
