"""Shard manifests: training refuses shards that no manifest covers (an interrupted preparer run, a changed file),
write_manifest.py admits shards made elsewhere after scanning them, and training compares the manifests' vocabulary
and max token id with the model's vocab_size before the first step. Foreign shards are written by hand (struct),
independently of shard_format.py."""

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from packed_dataset import training_batches, validation_batches
from prepare_data import prepare_text
from prepare_data.train_tokenizer import train_tokenizer
from pretrain.tinyllama import setup
from shard_format import PackedDatasetBuilder, write_manifest

ROOT = Path(__file__).resolve().parent.parent
SEQ_LEN = 16


def write_shards(directory: Path, prefix: str, n_files: int, vocab_size: int = 256, high: int = 255) -> None:
    """n_files files of 4 blocks of SEQ_LEN + 1 tokens in [0, high], high included, then a manifest."""
    builder = PackedDatasetBuilder(directory, prefix, chunk_size=4 * (SEQ_LEN + 1), vocab_size=vocab_size)
    tokens = np.random.default_rng(0).integers(0, high + 1, n_files * 4 * (SEQ_LEN + 1))
    tokens[7] = high
    builder.add_array(tokens.astype(np.uint16))
    builder.finish()
    write_manifest(directory)


def batches(data_dir: Path):
    return training_batches(data_dir, "train", SEQ_LEN + 1, 2, seed=1, num_processes=1, process_rank=0)


def test_shards_that_no_manifest_covers_are_refused(tmp_path):
    write_shards(tmp_path, "train_a", n_files=2)
    batches(tmp_path)  # covered
    stray = PackedDatasetBuilder(tmp_path, "train_text_1", chunk_size=SEQ_LEN + 1, vocab_size=256)
    stray.add_array(np.arange(SEQ_LEN + 1))
    stray.finish()  # as a preparer process whose run was killed before its manifest
    unlisted = tmp_path / "train_text_1_0000000000.bin"
    message = (f"{unlisted} is listed in no manifest (manifest*.json) of {tmp_path}: the preparer run that wrote it "
               f"did not finish (interrupted or killed) or the file changed since. Continue that run (python "
               f"prepare_data/prepare_text.py --name text --destination_path {tmp_path} --resume ...), or remove its "
               f"shards and run it again; for shards made elsewhere (lit-gpt's, TinyLlama's), run python "
               f"prepare_data/write_manifest.py --directory {tmp_path}")
    with pytest.raises(ValueError, match=re.escape(message)):
        batches(tmp_path)
    unlisted.unlink()
    changed = tmp_path / "train_a_0000000001.bin"
    changed.write_bytes(changed.read_bytes()[:-2])
    size = changed.stat().st_size
    with pytest.raises(ValueError, match=re.escape(f"{changed} is {size} bytes, but {tmp_path / 'manifest.json'} "
                                                   f"lists it with {size + 2} bytes")):
        batches(tmp_path)
    write_shards(tmp_path / "v", "validation_slimpajama_0", n_files=1)
    (tmp_path / "v" / "manifest.json").unlink()
    with pytest.raises(ValueError, match=re.escape("prepare_slimpajama.py --split validation")):
        validation_batches(tmp_path / "v", SEQ_LEN + 1, 2, num_processes=1, process_rank=0)


def test_a_preparer_killed_before_its_manifest_leaves_shards_that_training_refuses(tmp_path, monkeypatch):
    train_tokenizer([f"word{i} and more words, {i * 7}." for i in range(400)], tmp_path / "tok", vocab_size=300)
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": f"text {i} " * 20}) + "\n" for i in range(30)))
    args = dict(tokenizer_path=tmp_path / "tok", destination_path=tmp_path / "out", name="mine", num_processes=1,
                validation_fraction=0.0, chunk_size=SEQ_LEN + 1)
    prepare_text.main(str(tmp_path / "corpus.jsonl"), **args)
    for shard in (tmp_path / "out").glob("*.bin"):  # what the rerun of a complete run needs: its old shards gone
        shard.unlink()

    def killed(*args, **kwargs):
        raise SystemExit(137)

    monkeypatch.setattr("shard_packing.write_manifest", killed)
    with pytest.raises(SystemExit):  # killed after the summary, just before the manifest
        prepare_text.main(str(tmp_path / "corpus.jsonl"), **args)
    assert list((tmp_path / "out").glob("train_mine_0_*.bin"))
    assert not list((tmp_path / "out").glob("manifest*"))  # the first run's was removed as the rerun started
    rerun = f"prepare_text.py --name mine --destination_path {tmp_path / 'out'}"
    with pytest.raises(ValueError, match=re.escape(rerun)):
        batches(tmp_path / "out")


def lit_gpt_shard(path: Path, tokens: np.ndarray) -> None:
    """A LITPKDS v1 file as lit-gpt writes it: magic, version 1, dtype code 8 (uint16), chunk size, tokens."""
    path.write_bytes(struct.pack("<7sQBQ", b"LITPKDS", 1, 8, len(tokens)) + tokens.astype("<u2").tobytes())


def test_write_manifest_admits_foreign_shards_after_scanning_them(tmp_path):
    rng = np.random.default_rng(3)
    chunks = [rng.integers(0, 200, 4 * (SEQ_LEN + 1)) for _ in range(3)]
    chunks[1][5] = 211
    for i, chunk in enumerate(chunks):
        lit_gpt_shard(tmp_path / f"train_slim_{i:010d}.bin", chunk)
    with pytest.raises(ValueError, match=re.escape(f"python prepare_data/write_manifest.py --directory {tmp_path}")):
        batches(tmp_path)
    command = [sys.executable, str(ROOT / "prepare_data" / "write_manifest.py"), "--directory", str(tmp_path)]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["max_token_id"] == 211 and manifest["vocab_size"] is None
    assert manifest["files"] == {f"train_slim_{i:010d}.bin": {"bytes": 24 + 2 * 68, "tokens": 68} for i in range(3)}
    assert manifest["tokens"] == 3 * 68
    assert batches(tmp_path).dataset.datasets[0].n_blocks_total == 12

    (tmp_path / "train_slim_0000000003.bin").write_bytes(b"LITPKDS" + bytes(10))  # a truncated header
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1  # one line, no traceback
    assert "train_slim_0000000003.bin' is not a LITPKDS file: 17 bytes" in result.stderr
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest  # the old one is kept whole


@pytest.mark.parametrize("high, vocab_size, recorded", [(300, 512, "an unrecorded vocabulary with max token id 300"),
                                                        (200, 1000, "a 1000-token vocabulary with max token id 200")])
def test_data_beyond_the_models_vocabulary_is_refused_before_the_first_step(tmp_path, high, vocab_size, recorded):
    write_shards(tmp_path / "data", "train_a", n_files=2, vocab_size=vocab_size, high=high)
    if vocab_size == 1000:  # as a preparer run with a 1000-token tokenizer records it
        write_manifest(tmp_path / "data", vocab_size=1000)
    with pytest.raises(ValueError, match=re.escape(
            f"--train_data_mix 'train': {tmp_path / 'data' / 'manifest.json'} records shards of {recorded}, but "
            f"the model 'micro' has vocab_size=256: prepare the data with the model's tokenizer")):
        setup(model_name="micro", out_dir=tmp_path / "out", train_data_dir=tmp_path / "data", val_data_dir=None,
              train_data_mix="train", tokenizer_dir=None, accelerator="cpu", devices=1, precision="32-true",
              seq_len=SEQ_LEN, global_batch_size=2, micro_batch_size=2, max_steps=1)
    assert not list((tmp_path / "out").glob("step-*"))
