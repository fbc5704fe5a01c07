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
from typing import Iterator, Literal, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prepare_data.common import DEFAULT_CHUNK_SIZE, Job, Report, TokenDtype, find_files, prepare
from utils import cli

TEXT_COLUMN = "content"
LANGUAGE_COLUMN = "lang"


def read_documents(path: Path, report: Report, languages: Sequence[str] = ()) -> Iterator[Tuple[int, str]]:
    """The `content` of each row, one row group at a time (memory bounded by the row group, whatever the file
    size). With `languages`, rows of a file outside a language directory are selected by their `lang` column."""
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as error:
        report.unreadable(path, f"not a readable parquet file ({error})")
        return
    schema = parquet.schema_arrow
    if TEXT_COLUMN not in schema.names:
        report.unreadable(path, f"no {TEXT_COLUMN!r} column (columns: {schema.names})")
        return
    text_type = schema.field(TEXT_COLUMN).type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        report.unreadable(path, f"column {TEXT_COLUMN!r} holds {text_type}, expected strings")
        return
    by_column = bool(languages) and path.parent.name not in languages
    if by_column and LANGUAGE_COLUMN not in schema.names:
        report.unreadable(path, f"no {LANGUAGE_COLUMN!r} column (nor a language directory) to select {list(languages)}")
        return
    columns = [TEXT_COLUMN, LANGUAGE_COLUMN] if by_column else [TEXT_COLUMN]
    row = 0
    for group in range(parquet.num_row_groups):
        try:
            table = parquet.read_row_group(group, columns=columns)
        except (OSError, pa.ArrowException) as error:
            report.unreadable(path, f"row group {group} is unreadable ({error}); the {row} rows before it were used")
            return
        texts = table.column(TEXT_COLUMN).to_pylist()
        row_languages = table.column(LANGUAGE_COLUMN).to_pylist() if by_column else None
        for i, text in enumerate(texts):
            if row_languages is not None and row_languages[i] not in languages:
                report.excluded[str(row_languages[i])] += 1
                continue
            yield row + i, text or ""  # a null counts as an empty document
        row += len(texts)


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
    """
    files = select_files(Path(source_path), split, languages)
    job = Job(
        read_documents=partial(read_documents, languages=tuple(languages)),
        tokenizer_path=Path(tokenizer_path),
        destination=Path(destination_path),
        name="starcoder",
        split=split,
        chunk_size=chunk_size,
        bos=bos,
        eos=eos,
        strict=strict,
        dtype=dtype,
    )
    return prepare(job, files, num_processes)


if __name__ == "__main__":
    cli(main)
