"""Tokenize your own corpus (plain text, .py, or JSON lines / a JSON array with a text field) into train and validation
shards `{split}_{name}_{process}_*.bin`.

    python prepare_data/prepare_text.py --source_path "data/gutenberg/**/*.txt" \
        --tokenizer_path checkpoints/AMD-Llama-135m --destination_path data/gutenberg_packed --name gutenberg

A plain text or .py file is one document; a JSON lines file (.jsonl, .ndjson, their .zst) has one document per line,
and so has a .json file, unless it holds a JSON array (its first non-space character is "["): one document per item.
Each document goes to the validation split with probability validation_fraction, by a hash of its text: the split is
stable from run to run and independent of file order and process count.
"""

import sys
from functools import partial
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shard_packing import DEFAULT_CHUNK_SIZE, TokenDtype, prepare_files
from text_readers import Report, TEXT_SUFFIXES, find_inputs, read_text_documents
from utils import UserError, cli


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
    dtype: Optional[TokenDtype] = None,
    quiet: bool = False,
    num_nodes: Optional[int] = None,
    node_rank: Optional[int] = None,
    resume: bool = False,
) -> Report:
    """Tokenize your own corpus into train and validation shards {split}_{name}_{process}_*.bin in destination_path.

    Args:
        source_path: a directory (searched for .txt .py .md .rst .jsonl .ndjson .jsonl.zst .ndjson.zst .json, in any
            case; other files are skipped and counted), a glob (quote it), or a file
        tokenizer_path: directory with tokenizer.model, or the file itself
        destination_path: where the shards and summary_{name}.json are written
        name: shards are {split}_{name}_*.bin
        validation_fraction: the share of documents that go to the validation split (chosen by a hash of the text)
        text_key: the field of a JSON record that holds the document
        chunk_size: tokens per shard
        num_processes: processes that pack the files; none: all cores
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
    if not 0 <= validation_fraction <= 1:
        raise UserError(f"--validation_fraction must be in [0, 1], got {validation_fraction}")
    if not name or "/" in name:
        raise UserError(f"--name must be a non-empty file name part, got {name!r}")
    files, unknown_files = find_inputs(source_path, TEXT_SUFFIXES)
    return prepare_files(
        files, partial(read_text_documents, text_key=text_key), name=name, split=None,
        tokenizer_path=tokenizer_path, destination_path=destination_path, chunk_size=chunk_size,
        num_processes=num_processes, strict=strict, bos=bos, eos=eos, dtype=dtype, quiet=quiet,
        num_nodes=num_nodes, node_rank=node_rank, resume=resume,
        validation_fraction=validation_fraction, unknown_files=unknown_files,
    )


if __name__ == "__main__":
    cli(main)
