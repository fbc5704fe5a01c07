"""Tokenize StarCoder (`{source_path}/{language}/{split}-*.parquet`) into shards `{split}_starcoder_{process}_*.bin`.

    python prepare_data/prepare_starcoder.py --source_path data/starcoderdata \
        --tokenizer_path checkpoints/TinyLlama-1.1B --destination_path data/slim_star_combined --split train

bigcode/starcoderdata has one directory per language, each with `train-*.parquet` files and a `content` column;
the language is the directory's name. Files directly in source_path instead are read with their `lang` column.
`--languages python` gives the Python subset that AMD-Llama-135m-code was finetuned on.
"""

import sys
from functools import partial
from pathlib import Path
from typing import Literal, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shard_packing import DEFAULT_CHUNK_SIZE, TokenDtype, prepare_files
from text_readers import Report, find_files, read_parquet_documents
from utils import cli


def select_files(source_path: Path, split: str, languages: Sequence[str]) -> list:
    """`{source_path}/{language}/{split}-*.parquet` for the languages asked for (all when none), and the files
    directly in source_path (selected by their `lang` column)."""
    files = find_files(source_path, [f"{split}-*.parquet", f"*/{split}-*.parquet"])
    if not languages:
        return files
    found = {f.parent.name for f in files if f.parent != Path(source_path)}
    flat = [f for f in files if f.parent == Path(source_path)]
    missing = sorted(set(languages) - found)
    if missing and not flat:
        raise FileNotFoundError(
            f"No {split}-*.parquet files for languages {missing} in {str(source_path)!r};"
            f" languages found: {sorted(found)}"
        )
    return [f for f in files if f.parent == Path(source_path) or f.parent.name in languages]


def main(
    source_path: Path = Path("data/starcoderdata"),
    tokenizer_path: Path = Path("checkpoints/TinyLlama-1.1B"),
    destination_path: Path = Path("data/slim_star_combined"),
    split: Literal["train", "validation"] = "train",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    num_processes: Optional[int] = None,
    languages: Sequence[str] = (),
    strict: bool = False,
    bos: bool = True,
    eos: bool = True,
    dtype: Optional[TokenDtype] = None,
    quiet: bool = False,
    num_nodes: Optional[int] = None,
    node_rank: Optional[int] = None,
    resume: bool = False,
) -> Report:
    """Tokenize one split of StarCoder into shards {split}_starcoder_{process}_*.bin in destination_path.

    Args:
        source_path: the StarCoder download, with {language}/{split}-*.parquet (or {split}-*.parquet with a lang column)
        tokenizer_path: directory with tokenizer.model, or the file itself
        destination_path: where the shards and summary_{split}_starcoder.json are written
        split: which split of source_path to tokenize
        chunk_size: tokens per shard
        num_processes: processes that pack the files; none: all cores
        languages: languages to keep, e.g. python or python,java; empty: all
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
    files = select_files(Path(source_path), split, languages)
    return prepare_files(
        files, partial(read_parquet_documents, languages=tuple(languages)), name="starcoder", split=split,
        tokenizer_path=tokenizer_path, destination_path=destination_path, chunk_size=chunk_size,
        num_processes=num_processes, strict=strict, bos=bos, eos=eos, dtype=dtype, quiet=quiet,
        num_nodes=num_nodes, node_rank=node_rank, resume=resume,
    )


if __name__ == "__main__":
    cli(main)
