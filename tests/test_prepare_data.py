"""The data preparers against independent references: shards decoded by a hand-written LITPKDS parser (struct +
np.fromfile) compared with sentencepiece's own encoding of every kept document; inputs built in the test."""

import contextlib
import hashlib
import io
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import zstandard

from prepare_data import prepare_demo, prepare_slimpajama, prepare_starcoder, prepare_text
from prepare_data import train_tokenizer as train_tokenizer_script
from prepare_data.train_tokenizer import LLAMA2_SPEC, LineCounts, cut_line, read_any, train_tokenizer
from shard_packing import NothingWrittenError, ProgressLines, load_tokenizer, progress
from shard_format import PackedDatasetBuilder
from text_readers import BadInputError, Report, find_files, sample_documents
from utils import cli

BOS, EOS = 1, 2
WORDS = "the a of to and in is was for on that with as by from data model token train 12 345 (x) [y] {z}".split()


def sentences(n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice(".!?") for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(sentences(2000, seed=0), directory, vocab_size=320)
    return directory


@pytest.fixture(scope="module")
def sp(tokenizer_dir):
    return spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))


def read_shard(path):
    """Hand-written LITPKDS reader: 7-byte magic, uint64 version, uint8 dtype code, uint64 chunk size, tokens."""
    with open(path, "rb") as f:
        magic, version, code, chunk_size = struct.unpack("<7sQBQ", f.read(24))
    assert (magic, version) == (b"LITPKDS", 1)
    tokens = np.fromfile(path, dtype={8: np.uint16, 4: np.int32}[code], offset=24)
    assert len(tokens) == chunk_size
    return chunk_size, tokens


def read_prefix(directory, prefix, chunk_size=None):
    """All tokens of the shards `{prefix}_*.bin` in file order; every file but the last holds exactly chunk_size."""
    paths = sorted(Path(directory).glob(f"{prefix}_*.bin"))
    chunks = [read_shard(p) for p in paths]
    if chunk_size is not None:
        assert [size for size, _ in chunks[:-1]] == [chunk_size] * (len(chunks) - 1)
        assert 0 < chunks[-1][0] <= chunk_size
    return np.concatenate([tokens for _, tokens in chunks]).tolist() if chunks else []


def assert_manifest_written_last(destination, run, pattern, tokenizer_file, directories=("",)):
    """Each directory's manifest_{run}.json lists exactly the run's shards there (`pattern`) with their sizes and
    token counts (read by hand), the max id of all of them, the tokenizer's vocabulary and SHA-256; and it was
    written after every one of them and after the run's summary."""
    tokens = {}
    for directory in directories:
        tokens.update({path: read_shard(path)[1] for path in (destination / directory).glob(pattern)})
    vocab_size = spm.SentencePieceProcessor(model_file=str(tokenizer_file)).vocab_size()
    for directory in directories:
        manifest_path = destination / directory / f"manifest_{run}.json"
        manifest = json.loads(manifest_path.read_text())
        mine = {path: ids for path, ids in tokens.items() if path.parent == manifest_path.parent}
        assert manifest["files"] == {p.name: {"bytes": p.stat().st_size, "tokens": len(ids)} for p, ids in mine.items()}
        assert manifest["max_token_id"] == max(int(ids.max()) for ids in tokens.values())
        assert manifest["vocab_size"] == vocab_size
        assert manifest["tokenizer_sha256"] == hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()
        earlier = [*mine, destination / f"summary_{run}.json"]
        assert manifest_path.stat().st_mtime_ns >= max(path.stat().st_mtime_ns for path in earlier)


def split_documents(tokens):
    """Split a BOS ... EOS stream back into documents (the tokenizer never emits BOS or EOS for text)."""
    documents, current = [], None
    for token in tokens:
        if token == BOS:
            assert current is None
            current = []
        elif token == EOS:
            documents.append(tuple(current))
            current = None
        else:
            current.append(token)
    assert current is None
    return documents


def write_zst(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zstandard.ZstdCompressor().compress(b"".join(line + b"\n" for line in lines)))


def record(text, set_name):
    return json.dumps({"text": text, "meta": {"redpajama_set_name": set_name}}).encode()


@pytest.fixture
def slimpajama(tmp_path):
    """A SlimPajama tree; returns (source_path, the kept texts in file and line order)."""
    source, kept = tmp_path / "SlimPajama", []
    sets = ["RedPajamaCommonCrawl", "RedPajamaGithub", "RedPajamaBook", "RedPajamaC4", "RedPajamaWikipedia"]
    for chunk in (1, 2):
        for number in range(3):
            texts = sentences(15, seed=chunk * 10 + number)
            lines = []
            for i, text in enumerate(texts):
                lines.append(record(text, sets[i % len(sets)]))
                if sets[i % len(sets)] != "RedPajamaGithub":
                    kept.append(text)
            lines.insert(3, b'{"text": "broken json')  # line 4
            lines.insert(5, b'{"text": "invalid \xff utf-8", "meta": {}}')  # line 6
            lines.insert(7, record("", "RedPajamaC4"))
            lines.insert(8, record("   \n", "RedPajamaC4"))
            write_zst(source / "train" / f"chunk{chunk}" / f"example_train_{number}.jsonl.zst", lines)
    return source, kept


def test_slimpajama_tokens_in_order_and_counters(slimpajama, tokenizer_dir, sp, tmp_path):
    source, kept = slimpajama
    report = prepare_slimpajama.main(source, tokenizer_dir, tmp_path / "out", chunk_size=64, num_processes=1)
    expected = [t for text in kept for t in [BOS] + sp.encode(text) + [EOS]]
    assert read_prefix(tmp_path / "out", "train_slimpajama_0", chunk_size=64) == expected
    assert report.documents == {"train": len(kept)}
    assert report.tokens == {"train": len(expected)}
    assert report.excluded == {"RedPajamaGithub": 6 * 3}
    assert (report.empty_documents, report.skipped, report.unreadable_files) == (12, 12, 0)
    first = source / "train" / "chunk1" / "example_train_0.jsonl.zst"
    assert f"{first}:4: malformed JSON" in "\n".join(report.problems)
    assert f"{first}:6: invalid UTF-8" in "\n".join(report.problems)
    summary = json.loads((tmp_path / "out" / "summary_train_slimpajama.json").read_text())
    assert summary["documents"] == {"train": len(kept)} and summary["skipped"] == 12
    assert len(summary["shards"]) == -(-len(expected) // 64)
    assert_manifest_written_last(tmp_path / "out", "train_slimpajama", "*.bin", tokenizer_dir / "tokenizer.model")


def test_slimpajama_exclude_sets_and_no_separators_from_the_command_line(slimpajama, tokenizer_dir, sp, tmp_path):
    source, _ = slimpajama
    flags = ["--source_path", str(source), "--tokenizer_path", str(tokenizer_dir), "--num_processes", "1"]
    report = cli(prepare_slimpajama.main, [
        *flags, "--destination_path", str(tmp_path / "out"), "--chunk_size", "50",
        "--exclude_sets", "RedPajamaGithub,RedPajamaBook", "--no-bos", "--no-eos",
    ])  # fmt: skip
    assert report.excluded == {"RedPajamaGithub": 18, "RedPajamaBook": 18}
    kept = []
    for path in sorted(source.glob("train/chunk*/*.jsonl.zst")):
        for line in zstandard.ZstdDecompressor().decompress(path.read_bytes(), max_output_size=1 << 20).splitlines():
            try:
                item = json.loads(line)
            except ValueError:
                continue
            excluded = item["meta"].get("redpajama_set_name") in {"RedPajamaGithub", "RedPajamaBook"}
            if item["text"].strip() and not excluded:
                kept.append(item["text"])
    expected = [t for text in kept for t in sp.encode(text)]
    assert read_prefix(tmp_path / "out", "train_slimpajama_0", chunk_size=50) == expected
    with pytest.raises(ValueError, match="RedPajamaGitHub"):
        prepare_slimpajama.main(source, tokenizer_dir, tmp_path / "other", exclude_sets=("RedPajamaGitHub",))
    for bad in (["--split", "test"], ["--dtype", "int64"]):
        with pytest.raises(SystemExit):  # argparse: invalid choice
            cli(prepare_slimpajama.main, [*flags, "--destination_path", str(tmp_path / "other"), *bad])


def test_slimpajama_several_processes_keep_every_document(slimpajama, tokenizer_dir, sp, tmp_path):
    source, kept = slimpajama
    report = prepare_slimpajama.main(source, tokenizer_dir, tmp_path / "out", chunk_size=64, num_processes=2)
    documents = []
    for rank in (0, 1):
        documents += split_documents(read_prefix(tmp_path / "out", f"train_slimpajama_{rank}", chunk_size=64))
    assert Counter(documents) == Counter(tuple(sp.encode(text)) for text in kept)
    assert report.skipped == 12 and report.excluded == {"RedPajamaGithub": 18}


def test_slimpajama_strict_refuses_and_leaves_no_shards(slimpajama, tokenizer_dir, tmp_path):
    source, _ = slimpajama
    first = source / "train" / "chunk1" / "example_train_0.jsonl.zst"
    with pytest.raises(BadInputError, match=f"{first}:4: malformed JSON"):
        prepare_slimpajama.main(source, tokenizer_dir, tmp_path / "out", chunk_size=16, num_processes=1, strict=True)
    assert not list((tmp_path / "out").glob("*.bin"))


def test_corrupt_and_truncated_zst_are_reported(tmp_path, tokenizer_dir, sp):
    source = tmp_path / "SlimPajama"
    texts = sentences(30, seed=5)
    write_zst(source / "train" / "chunk1" / "a.jsonl.zst", [record(t, "RedPajamaC4") for t in texts[:10]])
    corrupt = source / "train" / "chunk1" / "b.jsonl.zst"
    corrupt.write_bytes(b"this is not zstd data at all")
    truncated = source / "train" / "chunk1" / "c.jsonl.zst"
    write_zst(truncated, [record(t, "RedPajamaC4") for t in texts[10:20]])
    truncated.write_bytes(truncated.read_bytes()[:-7])
    write_zst(source / "train" / "chunk2" / "d.jsonl.zst", [record(t, "RedPajamaC4") for t in texts[20:]])
    report = prepare_slimpajama.main(source, tokenizer_dir, tmp_path / "out", num_processes=1)
    assert report.unreadable_files == 2
    problems = "\n".join(report.problems)
    assert f"{corrupt}: unreadable after line 0" in problems and f"{truncated}: unreadable" in problems
    documents = split_documents(read_prefix(tmp_path / "out", "train_slimpajama_0"))
    # every document of the good files is kept, and at most the truncated file's last lines are lost
    good = [tuple(sp.encode(t)) for t in texts[:10] + texts[20:]]
    assert documents[:10] == good[:10] and documents[-10:] == good[10:]
    assert documents[10:-10] == [tuple(sp.encode(t)) for t in texts[10 : 10 + len(documents) - 20]]
    with pytest.raises(BadInputError, match=str(corrupt)):
        prepare_slimpajama.main(source, tokenizer_dir, tmp_path / "strict", num_processes=1, strict=True)


def write_parquet(path, columns, row_group_size=3):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


def test_starcoder_languages_row_groups_and_unreadable_files(tmp_path, tokenizer_dir, sp):
    source = tmp_path / "starcoderdata"
    python = sentences(10, seed=1) + [None, ""]
    write_parquet(source / "python" / "train-00000-of-00002.parquet", {"content": python, "id": list(range(12))})
    write_parquet(source / "java" / "train-00000-of-00001.parquet", {"content": sentences(7, seed=2)})
    mixed, languages = sentences(9, seed=3), ["python", "java", "c"] * 3
    write_parquet(source / "train-00000-of-00001.parquet", {"content": mixed, "lang": languages}, row_group_size=2)
    broken = source / "python" / "train-00001-of-00002.parquet"
    broken.write_bytes(b"PAR1 this is not a parquet file")

    report = prepare_starcoder.main(source, tokenizer_dir, tmp_path / "out", num_processes=1, languages=("python",))
    # files in sorted order: python/, then the flat file (rows selected by its lang column)
    kept = python[:10] + [t for t, lang in zip(mixed, languages) if lang == "python"]
    expected = [t for text in kept for t in [BOS] + sp.encode(text) + [EOS]]
    assert read_prefix(tmp_path / "out", "train_starcoder_0") == expected
    assert report.excluded == {"java": 3, "c": 3}
    assert (report.empty_documents, report.unreadable_files) == (2, 1)
    assert_manifest_written_last(tmp_path / "out", "train_starcoder", "*.bin", tokenizer_dir / "tokenizer.model")
    assert any(p.startswith(f"{broken}: not a readable parquet file") for p in report.problems)

    everything = prepare_starcoder.main(source, tokenizer_dir, tmp_path / "all", num_processes=1)
    assert everything.documents == {"train": 10 + 7 + 9}
    only_directories = tmp_path / "by_language"
    write_parquet(only_directories / "python" / "train-0.parquet", {"content": ["x = 1"]})
    with pytest.raises(FileNotFoundError, match=r"\['rust'\].*languages found: \['python'\]"):
        prepare_starcoder.main(only_directories, tokenizer_dir, tmp_path / "none", languages=("rust",))
    with pytest.raises(BadInputError, match=str(broken)):
        prepare_starcoder.main(source, tokenizer_dir, tmp_path / "strict", num_processes=1, strict=True)


def test_starcoder_reads_one_row_group_at_a_time(tmp_path, tokenizer_dir, monkeypatch):
    path = tmp_path / "src" / "python" / "train-0.parquet"
    write_parquet(path, {"content": sentences(20, seed=4)}, row_group_size=4)
    reads = []
    original = pq.ParquetFile.read_row_group
    def read_row_group(self, i, **kwargs):
        reads.append(i)
        return original(self, i, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", read_row_group)
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **kw: pytest.fail("whole-file read"))
    report = prepare_starcoder.main(tmp_path / "src", tokenizer_dir, tmp_path / "out", num_processes=1)
    # twice: the free-space check reads the smallest file (here the only one) before it is packed
    assert reads == [0, 1, 2, 3, 4] * 2 and report.documents == {"train": 20}


def expected_split(text, fraction):
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return "validation" if int.from_bytes(digest, "little") / 2**64 < fraction else "train"


def test_prepare_text_split_is_complete_and_deterministic(tmp_path, tokenizer_dir, sp):
    source = tmp_path / "corpus"
    (source / "books").mkdir(parents=True)
    documents = sentences(60, seed=7)
    for i, text in enumerate(documents[:20]):
        (source / "books" / f"book{i:02d}.txt").write_text(text)
    (source / "code.py").write_text(documents[20])
    lines = [json.dumps({"body": t}) for t in documents[21:]] + ['{"other": 1}', "not json"]
    (source / "more.jsonl").write_text("\n".join(lines) + "\n")
    (source / "latin1.txt").write_bytes("line one\ncaf\xe9".encode("latin-1"))
    (source / "notes.csv").write_text("ignored: not a text suffix")

    by_dir = prepare_text.main(str(source), tokenizer_dir, tmp_path / "a", name="mine", validation_fraction=0.3,
                               text_key="body", num_processes=1)
    assert by_dir.unknown_files == 1  # a directory walk skips (and counts) notes.csv; a glob that names it is refused
    with pytest.raises(ValueError, match=re.escape(f"{source / 'notes.csv'}: unknown file extension; expected one of")):
        prepare_text.main(f"{source}/**/*.*", tokenizer_dir, tmp_path / "b", name="mine", text_key="body")
    (source / "notes.csv").unlink()
    by_glob = prepare_text.main(f"{source}/**/*.*", tokenizer_dir, tmp_path / "b", name="mine", validation_fraction=0.3,
                                text_key="body", num_processes=2)
    assert by_dir.skipped == 3  # the line without "body", the malformed line, the latin-1 file
    assert f"{source / 'latin1.txt'}:2: invalid UTF-8" in "\n".join(by_dir.problems)
    assert by_glob.skipped == 3 and by_glob.unreadable_files == 0
    results = {}
    for out, processes in ((tmp_path / "a", 1), (tmp_path / "b", 2)):
        for split in ("train", "validation"):
            found = []
            for rank in range(processes):
                found += split_documents(read_prefix(out, f"{split}_mine_{rank}"))
            results[out.name, split] = Counter(found)
    for split in ("train", "validation"):
        wanted = Counter(tuple(sp.encode(t)) for t in documents if expected_split(t, 0.3) == split)
        assert results["a", split] == wanted == results["b", split]
    assert 0 < sum(results["a", "validation"].values()) < len(documents)
    summary = json.loads((tmp_path / "a" / "summary_mine.json").read_text())  # one per run, both splits
    assert_manifest_written_last(tmp_path / "b", "mine", "*.bin", tokenizer_dir / "tokenizer.model")
    assert summary["documents"] == {s: sum(results["a", s].values()) for s in ("train", "validation")}


def test_train_tokenizer_llama2_conventions(tokenizer_dir, sp):
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert (sp.id_to_piece(0), sp.id_to_piece(1), sp.id_to_piece(2)) == ("<unk>", "<s>", "</s>")
    unseen = "naïve 漢字 🙂"  # none of these characters is in the training text
    ids = sp.encode(unseen)
    assert 0 not in ids and sp.decode(ids) == unseen  # byte fallback, no <unk>
    assert sp.id_to_piece(ids[-1]).startswith("<0x")
    assert sp.decode(sp.encode("a  b   c")) == "a  b   c"  # extra whitespace kept
    assert sp.encode("Hello", out_type=str)[0].startswith("▁")  # dummy prefix
    assert all(sum(c.isdigit() for c in piece) <= 1 for piece in sp.encode("12 345 1234512345", out_type=str))
    from tokenizer import Tokenizer

    tokenizer = Tokenizer(tokenizer_dir)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (1, 2, 320)


def test_train_tokenizer_samples_every_format_within_its_budget(tmp_path):
    source = tmp_path / "mixed"
    write_zst(source / "a.jsonl.zst", [json.dumps({"text": t}).encode() for t in sentences(200, seed=11)])
    write_parquet(source / "b.parquet", {"content": sentences(200, seed=12)})
    (source / "c.txt").write_text("\n".join(sentences(200, seed=13)))
    files = find_files(source, ["*"])
    sample = list(sample_documents(files, read_any, 3000, Report()))
    # an equal share of 1000 characters per file, in file order, the last document of each cut to fit
    assert sample == [text for f in files for text in sample_documents([f], read_any, 1000, Report())]
    assert sum(map(len, sample)) == 3000
    path = train_tokenizer_script.main(str(source), tmp_path / "tokenizer", vocab_size=300, max_characters=100_000)
    assert path == tmp_path / "tokenizer" / "tokenizer.model"
    assert spm.SentencePieceProcessor(model_file=str(path)).vocab_size() == 300


def test_train_tokenizer_cuts_long_lines_instead_of_dropping_them(tmp_path, capsys):
    rng = random.Random(21)
    long_lines = [" ".join(rng.choice(WORDS) for _ in range(1200))[:6000] for _ in range(50)]  # 6 KB, one line each
    source = tmp_path / "a.jsonl"
    source.write_text("".join(json.dumps({"text": line}) + "\n" for line in long_lines))
    path = train_tokenizer_script.main(str(source), tmp_path / "out", vocab_size=300)
    assert spm.SentencePieceProcessor(model_file=str(path)).vocab_size() == 300
    printed = capsys.readouterr().out
    assert "50 lines, of which 50 longer than 4192 bytes were cut into 100 pieces" in printed

    counts = LineCounts()
    train_tokenizer(long_lines + ["short line", "\n  \n", "bad \ud800 line"], tmp_path / "again", 300, counts)
    assert (counts.lines, counts.cut_lines, counts.pieces, counts.invalid_lines) == (51, 50, 100, 1)


def test_cut_line_keeps_every_character_within_the_byte_limit():
    max_bytes = LLAMA2_SPEC["max_sentence_length"]
    words = " ".join(sentences(600, seed=3))
    assert len(words.encode()) > 3 * max_bytes
    pieces = cut_line(words, max_bytes)
    assert " ".join(pieces) == words  # cut at spaces, each dropped
    assert all(0 < len(p.encode()) <= max_bytes and not p.startswith(" ") for p in pieces)
    no_spaces = "é€𝄞x" * 1000  # 2-, 3-, 4- and 1-byte characters, no space: cut between characters
    pieces = cut_line(no_spaces, max_bytes)
    assert "".join(pieces) == no_spaces and len(pieces) == 3
    assert all(max_bytes - 3 <= len(p.encode()) <= max_bytes for p in pieces[:-1])
    assert cut_line("a b", 1) == ["a", "b"] and cut_line("short", max_bytes) == ["short"]


def test_train_tokenizer_without_text_names_the_source(tmp_path):
    source = tmp_path / "blank.jsonl"
    source.write_text('{"text": ""}\n{"text": "  \\n\\t "}\n{"text": "lone \\ud800"}\nnot json\n')
    with pytest.raises(ValueError, match=re.escape(repr(str(source))) + ": 1 files, 1 bad lines.*1 lines with a lone"):
        train_tokenizer_script.main(str(source), tmp_path / "out", vocab_size=300)
    assert not (tmp_path / "out" / "tokenizer.model").exists()


def test_prepare_demo_four_prefixes_and_idempotent(tmp_path, monkeypatch):
    settings = dict(vocab_size=512, chunk_size=257 * 4, validation_fraction=0.5, max_files=12)
    destination = prepare_demo.prepare_demo(tmp_path / "demo", **settings, num_processes=1, quiet=True)
    for split in ("train", "validation"):
        for kind in ("code", "prose"):
            assert list((destination / split).glob(f"{split}_{kind}_*.bin")), f"no {split}_{kind} shards"
    sp = spm.SentencePieceProcessor(model_file=str(destination / "tokenizer.model"))
    files = prepare_demo.stdlib_files(12)
    found = {}
    for split in ("train", "validation"):
        for kind in ("code", "prose"):
            documents = split_documents(read_prefix(destination / split, f"{split}_{kind}_0", chunk_size=257 * 4))
            found[split, kind] = Counter(documents)
    code = {f: tuple(sp.encode(f.read_text())) for f in files}
    prose = {f: tuple(sp.encode(prepare_demo.extract_prose(f.read_text()))) for f in files}
    for kind, expected in (("code", code), ("prose", prose)):
        written = found["train", kind] + found["validation", kind]
        assert written == Counter(ids for ids in expected.values() if ids)  # every non-empty document, once
    assert all("test" not in f.parts for f in prepare_demo.stdlib_files())

    # A file's code and its prose (the same docstrings) are in the same split, and the tokenizer saw only train files
    split_of = {f: next(s for s in ("train", "validation") if code[f] in found[s, "code"]) for f in files}
    assert set(split_of.values()) == {"train", "validation"}
    for f in files:
        if prose[f]:
            assert prose[f] in found[split_of[f], "prose"], f"{f}: its code and prose are in different splits"
    for f in files:
        sampled = [text for _, text in prepare_demo.read_train_documents(f, Report(), validation_fraction=0.5)]
        assert sampled == ([f.read_text()] if split_of[f] == "train" else [])

    summaries = {kind: json.loads((destination / f"summary_{kind}.json").read_text()) for kind in ("code", "prose")}
    for kind, summary in summaries.items():
        assert summary["documents"] == {s: sum(found[s, kind].values()) for s in ("train", "validation")}
    for kind in ("code", "prose"):
        assert_manifest_written_last(destination, kind, f"*_{kind}_*.bin", destination / "tokenizer.model",
                                     directories=("train", "validation"))
    marker = json.loads((destination / "summary.json").read_text())
    assert marker["settings"] == settings
    assert all(marker[kind]["documents"] == summary["documents"] for kind, summary in summaries.items())

    # A complete corpus: the same settings (here from the command line) return at once, touching nothing
    paths = sorted(p for p in destination.rglob("*") if p.is_file())
    mtimes = [p.stat().st_mtime_ns for p in paths]
    for name in ("stdlib_files", "docs_files", "train_tokenizer", "prepare"):
        monkeypatch.setattr(prepare_demo, name, lambda *args, **kwargs: pytest.fail("work on a complete corpus"))
    flags = [f"--{key}={value}" for key, value in settings.items()]
    assert cli(prepare_demo.prepare_demo, [f"--destination_path={destination}", *flags, "--quiet"]) == destination
    assert sorted(p for p in destination.rglob("*") if p.is_file()) == paths
    assert [p.stat().st_mtime_ns for p in paths] == mtimes
    with pytest.raises(ValueError, match="vocab_size"):
        prepare_demo.prepare_demo(tmp_path / "demo", vocab_size=1024, max_files=12, quiet=True)

    # A corpus built before manifests (or whose rebuild was killed) is rebuilt, keeping its tokenizer
    monkeypatch.undo()
    (destination / "validation" / "manifest_prose.json").unlink()
    tokenizer = (destination / "tokenizer.model").read_bytes()
    prepare_demo.prepare_demo(destination, **settings, num_processes=1, quiet=True)
    assert_manifest_written_last(destination, "prose", "*_prose_*.bin", destination / "tokenizer.model",
                                 directories=("train", "validation"))
    assert (destination / "tokenizer.model").read_bytes() == tokenizer


def test_extract_prose_takes_docstrings_and_comments_not_code():
    source = (
        '"""Module doc."""\nx = 1  # trailing\n# First line\n# second line.\n'
        'def f():\n    """Function doc."""\n    s = """\n# inside a string\n"""\n'
    )
    assert prepare_demo.extract_prose(source) == "Module doc.\n\nFirst line second line.\n\nFunction doc."


def test_data_preparation_never_imports_torch():
    """What a spawned packing process imports; torch would cost each process seconds and hundreds of MB."""
    modules = ["text_readers", "shard_packing", "prepare_data.prepare_slimpajama", "prepare_data.prepare_starcoder",
               "prepare_data.prepare_text", "prepare_data.train_tokenizer", "prepare_data.prepare_demo",
               "prepare_data.write_manifest", "shard_format", "tokenizer"]
    code = (f"import importlib, sys\nfor name in {modules!r}:\n    importlib.import_module(name)\n"
            "    assert 'torch' not in sys.modules, f'importing {name} imported torch'")
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_missing_inputs_are_named(tmp_path, tokenizer_dir):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing / "train"))):
        prepare_slimpajama.main(missing, tokenizer_dir, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        prepare_text.main(str(missing), tokenizer_dir, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        prepare_starcoder.main(missing, tokenizer_dir, tmp_path / "out")
    pattern = str(tmp_path / "*.jsonl")
    with pytest.raises(FileNotFoundError, match=re.escape(repr(pattern))):
        prepare_text.main(pattern, tokenizer_dir, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        find_files(tmp_path / "empty", ["**/*.txt"])


def test_vocabulary_that_does_not_fit_the_dtype_is_refused(tmp_path, tokenizer_dir):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel

    big = tmp_path / "big"
    big.mkdir()
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(70_000)}}
    HFTokenizer(WordLevel(vocab, unk_token="<unk>")).save(str(big / "tokenizer.json"))
    with pytest.raises(ValueError) as refused:
        load_tokenizer(big, bos=True, eos=True, dtype="uint16")
    with pytest.raises(ValueError) as builder_refused:  # the one check, that of the shard writer
        PackedDatasetBuilder(tmp_path / "shards", "x", chunk_size=8, vocab_size=70003, dtype=np.uint16)
    assert str(refused.value) == f"{big / 'tokenizer.json'}: {builder_refused.value}"
    assert "70003 does not fit dtype uint16" in str(refused.value)
    assert load_tokenizer(big, bos=True, eos=True, dtype=None)[1] == np.int32


def test_tokenizer_without_bos_is_refused_unless_no_bos(tmp_path, slimpajama):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences(300, seed=9)), model_writer=model, vocab_size=300,
                                   model_type="bpe", byte_fallback=True, bos_id=-1, minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    source, kept = slimpajama
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "tokenizer.model")) + " defines no BOS.*--no-bos"):
        prepare_slimpajama.main(source, tmp_path, tmp_path / "out")
    report = prepare_slimpajama.main(source, tmp_path, tmp_path / "out", bos=False, num_processes=1)
    assert report.documents == {"train": len(kept)}


def test_lone_surrogates_and_missing_text_are_skipped(tmp_path, tokenizer_dir, sp):
    source = tmp_path / "src" / "train" / "chunk1"
    lines = [record("good one", "RedPajamaC4"), b'{"text": "bad \\ud800 surrogate"}', b'{"meta": {}}', b"[1, 2]",
             record("good two", "RedPajamaC4")]
    write_zst(source / "x.jsonl.zst", lines)
    report = prepare_slimpajama.main(tmp_path / "src", tokenizer_dir, tmp_path / "out", num_processes=1)
    assert report.skipped == 3 and report.documents == {"train": 2}
    problems = "\n".join(report.problems)
    assert ":2: text is not valid Unicode" in problems and ":3: no string 'text'" in problems
    assert ":4: expected a JSON object" in problems
    expected = [t for text in ("good one", "good two") for t in [BOS] + sp.encode(text) + [EOS]]
    assert read_prefix(tmp_path / "out", "train_slimpajama_0") == expected


def test_json_records_are_read_whatever_the_extension_and_its_case(tmp_path, tokenizer_dir, sp):
    source = tmp_path / "corpus"
    source.mkdir()
    texts = sentences(12, seed=31)
    lines = [[json.dumps({"text": t}) + "\n" for t in texts[i : i + 3]] for i in range(0, 9, 3)]
    (source / "a.ndjson").write_text("".join(lines[0]))
    (source / "b.json").write_text("".join(lines[1]))  # JSON lines, though named .json
    write_zst(source / "c.Jsonl.ZST", [line.rstrip("\n").encode() for line in lines[2]])
    array = [{"text": texts[9], "input": ""}, 7, {"text": texts[10]}, {"text": texts[11]}]  # as Alpaca's files
    (source / "d.JSON").write_text("\n  " + json.dumps(array, indent=1))
    (source / "notes.csv").write_text("not a known extension")

    def documents(source_path, out):
        report = prepare_text.main(str(source_path), tokenizer_dir, tmp_path / out, validation_fraction=0,
                                   num_processes=1)
        return report, split_documents(read_prefix(tmp_path / out, "train_text_0"))

    report, found = documents(source, "walk")
    assert found == [tuple(sp.encode(t)) for t in texts]  # every record, none as raw JSON text
    assert (report.unknown_files, report.skipped) == (1, 1)
    assert f"{source / 'd.JSON'}:2: array item 2 is a int, expected a JSON object" in report.problems
    summary = json.loads((tmp_path / "walk" / "summary_text.json").read_text())
    assert summary["unknown_files"] == 1
    assert documents(source / "a.ndjson", "file")[1] == [tuple(sp.encode(t)) for t in texts[:3]]
    assert documents(f"{source}/[bc]*", "glob")[1] == [tuple(sp.encode(t)) for t in texts[3:9]]
    for named in (source / "notes.csv", f"{source}/*.csv", f"{source}/*"):
        with pytest.raises(ValueError, match=re.escape(f"{source / 'notes.csv'}: unknown file extension; expected one"
                                                       " of .txt .py .md .rst .jsonl .ndjson")):
            prepare_text.main(str(named), tokenizer_dir, tmp_path / "refused")


def test_a_run_that_keeps_no_document_fails_and_names_why(tmp_path, tokenizer_dir, slimpajama):
    source = tmp_path / "c.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences(5, seed=3)))
    expected = f"text: no document kept from 1 files: 5 lines or documents skipped, 0 unreadable files, 0 empty and 0" \
               f" excluded documents; wrote no shards; the first: {source}:1: no string 'txt' field (--text_key)"
    with pytest.raises(NothingWrittenError, match=re.escape(expected)):
        prepare_text.main(str(source), tokenizer_dir, tmp_path / "out", text_key="txt", num_processes=1)
    array = tmp_path / "alpaca.json"
    array.write_text('[{"text": "unterminated"')
    with pytest.raises(NothingWrittenError, match=re.escape(f"{array}: malformed JSON array")):
        prepare_text.main(str(array), tokenizer_dir, tmp_path / "out", num_processes=1)
    assert not list((tmp_path / "out").iterdir())  # no shards, no summary

    empty = slimpajama[0] / "train" / "chunk2" / "empty.jsonl.zst"  # a download that failed
    empty.write_bytes(b"")
    report = prepare_slimpajama.main(slimpajama[0], tokenizer_dir, tmp_path / "slim", num_processes=1)
    assert report.unreadable_files == 1 and report.documents["train"] == len(slimpajama[1])
    assert f"{empty}: unreadable after line 0 (the file is empty, with no zstd frame" in "\n".join(report.problems)
    only_empty = tmp_path / "only_empty" / "train" / "chunk1"
    only_empty.mkdir(parents=True)
    (only_empty / "a.jsonl.zst").write_bytes(b"")
    with pytest.raises(NothingWrittenError, match="0 lines or documents skipped, 1 unreadable files"):
        prepare_slimpajama.main(only_empty.parent.parent, tokenizer_dir, tmp_path / "slim_empty", num_processes=1)


@pytest.mark.parametrize("signum, processes", [(signal.SIGTERM, 2), (signal.SIGINT, 2), (signal.SIGTERM, 1)])
def test_an_interrupted_run_removes_its_shards_and_stops_its_processes(tmp_path, tokenizer_dir, signum, processes):
    source, out = tmp_path / "corpus", tmp_path / "out"
    source.mkdir()
    for i in range(4):  # with 8 tokens a shard, a run of 30,000 shards: ~20 s, far more than the test waits
        (source / f"{i}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences(3000, seed=i)))
    script = Path(__file__).resolve().parent.parent / "prepare_data" / "prepare_text.py"
    run = subprocess.Popen([sys.executable, str(script), "--source_path", str(source), "--tokenizer_path",
                            str(tokenizer_dir), "--destination_path", str(out), "--chunk_size", "8",
                            "--num_processes", str(processes)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           preexec_fn=default_sigint)
    workers = []
    try:
        deadline = time.monotonic() + 60
        while not list(out.glob("*.bin")):  # mid-run: shards are being written
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()
            time.sleep(0.02)
        workers = [int(p.name) for p in Path("/proc").glob("[0-9]*") if proc_stat(p.name)[1:2] == [str(run.pid)]]
        run.send_signal(signum)
        # the packing processes are stopped, not waited for: seconds alone, more beside the suite's other processes
        _, stderr = run.communicate(timeout=30)
    finally:
        if run.poll() is None:  # the test failed: leave nothing running
            kill([run.pid, *workers])
    assert run.returncode in ((128 + signum), -signum), stderr.decode()
    assert sorted(p.name for p in out.iterdir()) == []  # no shard, no temporary file, no summary
    assert "interrupted" in stderr.decode() and "removed this run's shards" in stderr.decode()
    assert len(workers) >= (processes if processes > 1 else 0)  # (one process packs in the main process)
    deadline = time.monotonic() + 15  # the packing processes end with the run (zombies may wait for init to reap them)
    running = workers
    while running and time.monotonic() < deadline:
        time.sleep(0.05)
        running = [pid for pid in running if proc_stat(pid)[:1] not in ([], ["Z"])]
    kill(running)
    assert not running, f"processes {running} of the interrupted run still run"


def default_sigint():
    """SIGINT back to its default in the child: a suite started in the background by a non-interactive shell runs with
    SIGINT ignored, which the run would inherit (Python then installs no KeyboardInterrupt handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def kill(pids):
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def proc_stat(pid):
    """The fields of /proc/{pid}/stat after the command name (state, parent pid, ...); [] once the process ended."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def test_progress_is_plain_lines_off_a_terminal(capsys):
    """Under pytest, stderr is not a terminal: lines now and then instead of tqdm's carriage-return updates."""
    bar = progress(2_000_000, "code", quiet=False)
    assert isinstance(bar, ProgressLines)
    bar.interval = 0.0
    bar.update(500_000)
    bar.update(1_500_000)
    bar.close()
    assert re.fullmatch(r"code: 25% of 2\.0 MB, \d+ s\ncode: 100% of 2\.0 MB, \d+ s\n", capsys.readouterr().err)


def test_every_corpus_preparer_has_the_same_common_flags_and_quiet_prints_nothing(tmp_path, tokenizer_dir, capsys):
    import inspect

    from prepare_data import prepare_slimpajama, prepare_starcoder, prepare_text

    common = ("chunk_size", "num_processes", "strict", "bos", "eos", "dtype", "quiet", "num_nodes", "node_rank",
              "resume")
    signatures = [inspect.signature(module.main).parameters for module in
                  (prepare_text, prepare_slimpajama, prepare_starcoder)]
    for name in common:
        assert len({(str(parameters[name].annotation), parameters[name].default) for parameters in signatures}) == 1
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(" ".join(sentences(20, seed=1)))
    capsys.readouterr()
    prepare_text.main(source_path=str(tmp_path / "corpus"), tokenizer_path=tokenizer_dir,
                      destination_path=tmp_path / "out", num_processes=1, quiet=True)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert (tmp_path / "out" / "summary_text.json").is_file()
