"""shard_format.py and packed_dataset.py against hand-written LITPKDS encoders/decoders (struct + numpy, the way
lit-gpt writes files)."""

import os
import struct
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import packed_dataset
from packed_dataset import CombinedDataset, PackedDataset, parse_data_mix, training_batches
from shard_format import PackedDatasetBuilder, dtype_for_vocab
from test_pretrain import SEQ_LEN, data_dir  # noqa: F401 (data_dir: a fixture)
from utils import UserError


UINT16, INT32 = 8, 4  # lit-gpt's dtype codes


def litgpt_file(path, tokens, code=UINT16, chunk_size=None, pad_id=1):
    """A file written the way lit-gpt does: header, then chunk_size tokens (a short array is padded with pad_id)."""
    dtype = {UINT16: np.uint16, INT32: np.int32}[code]
    chunk_size = len(tokens) if chunk_size is None else chunk_size
    data = np.full(chunk_size, pad_id, dtype=dtype)
    data[:len(tokens)] = tokens
    Path(path).write_bytes(b"LITPKDS" + struct.pack("<Q", 1) + struct.pack("<B", code) + struct.pack("<Q", chunk_size)
                           + data.tobytes())
    return str(path)


def decode(path):
    """Hand-written LITPKDS reader: (magic, version, dtype code, chunk size, tokens)."""
    raw = Path(path).read_bytes()
    magic = raw[:7]
    (version,) = struct.unpack("<Q", raw[7:15])
    (code,) = struct.unpack("<B", raw[15:16])
    (chunk_size,) = struct.unpack("<Q", raw[16:24])
    tokens = np.frombuffer(raw[24:], dtype={UINT16: np.uint16, INT32: np.int32}[code])
    assert len(tokens) == chunk_size
    return magic, version, code, chunk_size, tokens.tolist()


def reference_blocks(filenames, block_size):
    """Every block, file by file, in order: what a plain sequential reader gets."""
    blocks = []
    for name in filenames:
        tokens = decode(name)[4]
        blocks += [tuple(tokens[i:i + block_size]) for i in range(0, len(tokens) - block_size + 1, block_size)]
    return blocks


def make_files(tmp_path, n_files, block_size=4):
    """Files of varying sizes, distinct tokens everywhere (so every block is recognizable), with tails to skip."""
    filenames, next_token = [], 0
    for i in range(n_files):
        n_tokens = block_size * (3 + i % 3) + (i + 1) % block_size
        filenames.append(litgpt_file(tmp_path / f"data_{i:010d}.bin", np.arange(next_token, next_token + n_tokens)))
        next_token += n_tokens
    return filenames


def as_tuples(blocks):
    return [tuple(block.tolist()) for block in blocks]


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


# ---------------------------------------------------------------- the builder and the file format


def test_builder_round_trip_header_and_no_padding(tmp_path):
    rng = np.random.default_rng(0)
    documents = [rng.integers(0, 1000, size=n) for n in (7, 1, 30, 12, 0, 5)]  # 55 tokens
    builder = PackedDatasetBuilder(tmp_path / "out", "train_text_0", chunk_size=16, vocab_size=1000)
    for document in documents:
        builder.add_array(document)
    assert builder.n_tokens == 55
    assert len(builder.filenames) == 3  # full chunks are written as soon as they fill up
    filenames = builder.finish()

    assert [os.path.basename(f) for f in filenames] == [f"train_text_0_{i:010d}.bin" for i in range(4)]
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.path.basename(f) for f in filenames)  # no temp files
    decoded = [decode(f) for f in filenames]
    assert [d[:4] for d in decoded] == [(b"LITPKDS", 1, UINT16, 16)] * 3 + [(b"LITPKDS", 1, UINT16, 7)]
    assert os.path.getsize(filenames[-1]) == 24 + 7 * 2  # the last chunk has its real size: no padding at all
    assert sum((d[4] for d in decoded), []) == np.concatenate(documents).tolist()


def test_full_chunks_are_byte_identical_to_litgpt(tmp_path):
    for vocab_size, code, dtype in ((32000, UINT16, np.uint16), (65536, UINT16, np.uint16), (100352, INT32, np.int32)):
        tokens = np.random.default_rng(1).integers(0, vocab_size, size=24)
        builder = PackedDatasetBuilder(tmp_path, f"v{vocab_size}", chunk_size=8, vocab_size=vocab_size)
        builder.add_array(tokens)
        filenames = builder.finish()
        assert len(filenames) == 3  # an exact multiple leaves no empty last file
        for i, name in enumerate(filenames):
            header = b"LITPKDS" + struct.pack("<Q", 1) + struct.pack("<B", code) + struct.pack("<Q", 8)
            expected = header + tokens[8 * i:8 * i + 8].astype(dtype).tobytes()
            assert len(expected) == 24 + 8 * np.dtype(dtype).itemsize
            assert Path(name).read_bytes() == expected


def test_dtype_for_vocab():
    assert dtype_for_vocab(32000) == np.uint16
    assert dtype_for_vocab(65536) == np.uint16
    assert dtype_for_vocab(65537) == np.int32
    assert dtype_for_vocab(128256) == np.int32


def test_builder_rejects_bad_ids(tmp_path):
    builder = PackedDatasetBuilder(tmp_path, "x", chunk_size=8, vocab_size=65536)
    with pytest.raises(ValueError, match=r"token id 65536 .*65535.*uint16"):
        builder.add_array(np.array([1, 65536]))
    with pytest.raises(ValueError, match=r"token id -1"):
        builder.add_array(np.array([3, -1]))
    with pytest.raises(TypeError, match="integers"):
        builder.add_array(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="token id 40"):
        PackedDatasetBuilder(tmp_path, "y", chunk_size=8, vocab_size=40).add_array([39, 40])
    with pytest.raises(ValueError, match="does not fit dtype uint16"):
        PackedDatasetBuilder(tmp_path, "z", chunk_size=8, vocab_size=70000, dtype=np.uint16)
    assert builder.n_tokens == 0 and builder.finish() == []


def test_builder_write_is_atomic(tmp_path, monkeypatch):
    builder = PackedDatasetBuilder(tmp_path, "x", chunk_size=4, vocab_size=100)

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        builder.add_array(np.arange(4))
    assert os.listdir(tmp_path) == []  # neither a .bin nor a temp file is left


def test_reads_litgpt_files(tmp_path):
    filenames = [
        litgpt_file(tmp_path / "a.bin", np.arange(100, 112), UINT16),
        litgpt_file(tmp_path / "b.bin", np.arange(70000, 70008), INT32),
        # the last chunk of lit-gpt's builder: padded up to the full chunk size with the separator token
        litgpt_file(tmp_path / "c.bin", np.arange(300, 305), UINT16, chunk_size=12, pad_id=1),
    ]
    dataset = PackedDataset(filenames, n_chunks=2, block_size=4, shuffle=False)
    blocks = list(dataset)
    assert all(block.dtype == torch.int64 and block.shape == (4,) for block in blocks)
    assert as_tuples(blocks) == reference_blocks(filenames, 4)
    assert as_tuples(blocks)[-2:] == [(304, 1, 1, 1), (1, 1, 1, 1)]  # lit-gpt's padding is in the file: read as is


def test_builder_output_reads_back(tmp_path):
    tokens = np.random.default_rng(2).integers(0, 50000, size=103)
    builder = PackedDatasetBuilder(tmp_path, "x", chunk_size=20, vocab_size=50000)
    builder.add_array(tokens)
    filenames = builder.finish()
    dataset = PackedDataset(filenames, n_chunks=4, block_size=5, shuffle=False)
    assert dataset.n_skipped_tokens == 3  # the 3-token last chunk is shorter than a block
    assert dataset.summary().endswith("20 blocks of 5 tokens (100 tokens; 3 tokens at the ends of files fill no block "
                                      "and are not read, 1 of 6 files are shorter than one block)")
    assert dataset.n_blocks == 20
    assert [t for block in dataset for t in block.tolist()] == tokens[:100].tolist()


# ---------------------------------------------------------------- sharding, shuffle, epochs


@pytest.mark.parametrize("n_files", [1, 2, 5])
@pytest.mark.parametrize("num_processes", [1, 2, 3])
@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_every_block_exactly_once_per_epoch(tmp_path, n_files, num_processes, num_workers):
    filenames = make_files(tmp_path, n_files)
    expected = Counter(reference_blocks(filenames, 4))
    collected, per_rank = Counter(), []
    for rank in range(num_processes):
        dataset = PackedDataset(filenames, n_chunks=3, block_size=4, seed=7, num_processes=num_processes,
                                process_rank=rank)
        blocks = as_tuples(DataLoader(dataset, batch_size=None, num_workers=num_workers))
        assert blocks == as_tuples(dataset)  # the workers take turns: the rank's own order
        per_rank.append(len(blocks))
        collected.update(blocks)
    assert collected == expected
    assert max(per_rank) - min(per_rank) <= 1


@pytest.mark.parametrize("n_files", [1, 2, 5])
def test_sharding_without_shuffle(tmp_path, n_files):
    filenames = make_files(tmp_path, n_files)
    expected = reference_blocks(filenames, 4)
    sequential = as_tuples(PackedDataset(filenames, n_chunks=3, block_size=4, shuffle=False))
    assert sequential == expected  # sequential order, exactly
    for num_processes in (2, 3):
        ranks = [as_tuples(PackedDataset(filenames, n_chunks=3, block_size=4, shuffle=False,
                                         num_processes=num_processes, process_rank=rank))
                 for rank in range(num_processes)]
        assert Counter(sum(ranks, [])) == Counter(expected)
        assert ranks[0] == expected[::num_processes]


def test_shuffle_is_deterministic_and_seeded(tmp_path):
    filenames = make_files(tmp_path, 6)
    expected = Counter(reference_blocks(filenames, 4))

    def order(seed):
        return as_tuples(PackedDataset(filenames, n_chunks=2, block_size=4, seed=seed))

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert Counter(order(1)) == expected and Counter(order(2)) == expected
    assert order(1) != reference_blocks(filenames, 4)


def test_wrap_gives_a_new_complete_order_every_epoch(tmp_path):
    filenames = make_files(tmp_path, 4)
    expected = Counter(reference_blocks(filenames, 4))
    for rank in range(2):
        dataset = PackedDataset(filenames, n_chunks=2, block_size=4, wrap=True, num_processes=2, process_rank=rank)
        iterator = iter(dataset)
        epochs = [as_tuples(take(iterator, dataset.n_blocks)) for _ in range(3)]
        assert len(set(map(tuple, epochs))) == 3
        assert all(len(set(epoch)) == len(epoch) for epoch in epochs)  # no block twice within an epoch
    # together, the two ranks read every block once per epoch
    ranks = [PackedDataset(filenames, n_chunks=2, block_size=4, wrap=True, num_processes=2, process_rank=r)
             for r in range(2)]
    iterators = [iter(dataset) for dataset in ranks]
    for _ in range(3):
        epoch = sum((as_tuples(take(it, dataset.n_blocks)) for it, dataset in zip(iterators, ranks)), [])
        assert Counter(epoch) == expected


def test_shuffle_buffer_holds_n_chunks_files_and_the_file_order_changes(tmp_path):
    filenames = make_files(tmp_path, 6)
    file_of = {block: i for i, name in enumerate(filenames) for block in reference_blocks([name], 4)}
    n_blocks_of = Counter(file_of.values())
    iterator = iter(PackedDataset(filenames, n_chunks=2, block_size=4, seed=11, wrap=True))
    window_sequences = []
    for _ in range(3):
        windows, seen, count = [], set(), 0
        for block in as_tuples(take(iterator, len(file_of))):
            seen.add(file_of[block])
            count += 1
            if count == sum(n_blocks_of[f] for f in seen):  # the window holds all the blocks of the files it opened
                windows.append(frozenset(seen))
                seen, count = set(), 0
        assert [len(window) for window in windows] == [2, 2, 2]
        window_sequences.append(windows)
    assert window_sequences[0] != [{0, 1}, {2, 3}, {4, 5}]  # the files are shuffled before they are grouped
    assert len({tuple(windows) for windows in window_sequences}) > 1  # ... anew every epoch
    # a single file (one window): the blocks within it get a new order every epoch too
    single = PackedDataset(filenames[2:3], n_chunks=2, block_size=4, wrap=True)
    iterator = iter(single)
    epochs = [as_tuples(take(iterator, single.n_blocks)) for _ in range(3)]
    assert len(set(map(tuple, epochs))) == 3


def test_dataloader_workers_continue_from_a_loaded_state(tmp_path, monkeypatch):
    filenames = make_files(tmp_path, 5)
    dataset = PackedDataset(filenames, n_chunks=2, block_size=4, num_processes=2, process_rank=1)
    uninterrupted = as_tuples(dataset)
    for k in (3, 4):
        first = PackedDataset(filenames, n_chunks=2, block_size=4, num_processes=2, process_rank=1)
        take(iter(first), k)
        resumed = PackedDataset(filenames, n_chunks=2, block_size=4, num_processes=2, process_rank=1)
        resumed.load_state_dict(first.state_dict())
        assert as_tuples(DataLoader(resumed, batch_size=None, num_workers=2)) == uninterrupted[k:]
    # with wrap, a worker that gets no block would never yield: refused with a clear error
    tiny = PackedDataset(filenames[:1], n_chunks=1, block_size=12, wrap=True)
    assert tiny.n_blocks == 1
    monkeypatch.setattr(packed_dataset, "get_worker_info", lambda: SimpleNamespace(id=1, num_workers=2))
    with pytest.raises(ValueError, match="worker 1 of rank 0 gets none of the rank's 1 blocks"):
        next(iter(tiny))


def test_small_files_are_skipped_and_counted(tmp_path):
    filenames = [litgpt_file(tmp_path / "small.bin", np.arange(3)),
                 litgpt_file(tmp_path / "big.bin", np.arange(10, 19))]
    dataset = PackedDataset(filenames, n_chunks=8, block_size=4)
    assert dataset.n_skipped_tokens == 3 + 1
    assert dataset.summary() == ("2 files, small.bin ... big.bin, 2 blocks of 4 tokens (8 tokens; 4 tokens at the ends "
                                 "of files fill no block and are not read, 1 of 2 files are shorter than one block)")
    assert sorted(as_tuples(dataset)) == [(10, 11, 12, 13), (14, 15, 16, 17)]
    with pytest.raises(ValueError, match="holds a whole block of 4 tokens"):
        PackedDataset(filenames[:1], n_chunks=8, block_size=4)
    with pytest.raises(ValueError, match="rank 2 would get none"):
        PackedDataset(filenames, n_chunks=8, block_size=4, num_processes=3, process_rank=2)


# ---------------------------------------------------------------- save / restore


@pytest.mark.parametrize("k", [0, 1, 9, 10, 11, 25])
@pytest.mark.parametrize("shuffle", [True, False])
def test_resume_continues_the_same_sequence(tmp_path, k, shuffle):
    filenames = make_files(tmp_path, 5)  # 19 blocks: rank 0 of 2 gets 10 per epoch, rank 1 gets 9

    def dataset(rank=0):
        return PackedDataset(filenames, n_chunks=2, block_size=4, seed=3, shuffle=shuffle, wrap=True,
                             num_processes=2, process_rank=rank)

    assert (dataset(0).n_blocks, dataset(1).n_blocks) == (10, 9)

    uninterrupted = as_tuples(take(iter(dataset()), 60))
    first = dataset()
    head = as_tuples(take(iter(first), k))
    state = first.state_dict()
    path = tmp_path / "state.pt"
    torch.save(state, path)
    state = torch.load(path, weights_only=True)  # plain ints only
    resumed = dataset()
    resumed.load_state_dict(state)
    assert head + as_tuples(take(iter(resumed), 60 - k)) == uninterrupted
    assert state["epoch"] == k // 10
    # ranks step in lockstep: rank 0's state resumes rank 1 too (whose epochs are one block shorter)
    rank1 = dataset(1)
    rank1.load_state_dict(state)
    assert as_tuples(take(iter(rank1), 10)) == as_tuples(take(iter(dataset(1)), k + 10))[k:]


def test_resume_is_arithmetic_not_a_replay(tmp_path):
    filenames = make_files(tmp_path, 5)
    dataset = PackedDataset(filenames, n_chunks=2, block_size=4, wrap=True)
    state = dataset.state_dict()
    state["blocks_consumed"] = dataset.n_blocks * 10**9  # the start of epoch one billion: instant
    dataset.load_state_dict(state)
    iterator = iter(dataset)
    epoch = as_tuples(take(iterator, dataset.n_blocks))
    assert Counter(epoch) == Counter(reference_blocks(filenames, 4))
    assert dataset.state_dict()["epoch"] == 10**9 + 1


def test_resume_without_wrap_ends_and_next_iter_restarts(tmp_path):
    filenames = make_files(tmp_path, 2)
    dataset = PackedDataset(filenames, n_chunks=2, block_size=4, wrap=False)
    everything = as_tuples(dataset)
    assert len(everything) == dataset.n_blocks
    state = dataset.state_dict()
    assert state["blocks_consumed"] == dataset.n_blocks
    dataset.load_state_dict(state)
    assert list(dataset) == []  # exhausted
    assert as_tuples(dataset) == everything  # a new iter() without load_state_dict starts from the beginning


def test_state_from_another_dataset_is_refused(tmp_path):
    filenames = make_files(tmp_path, 3)
    state = PackedDataset(filenames, n_chunks=2, block_size=4, num_processes=2).state_dict()
    other = PackedDataset(filenames, n_chunks=2, block_size=4, num_processes=1)
    with pytest.raises(UserError, match="num_processes=2"):
        other.load_state_dict(state)


# ---------------------------------------------------------------- CombinedDataset


def two_sources(tmp_path, wrap=(True, True), blocks=(20, 10)):
    # source 0 holds tokens < 1000, source 1 tokens >= 1000
    a = litgpt_file(tmp_path / "a.bin", np.arange(0, 2 * blocks[0]))
    b = litgpt_file(tmp_path / "b.bin", np.arange(1000, 1000 + 2 * blocks[1]))
    return [PackedDataset([a], n_chunks=1, block_size=2, seed=5, wrap=wrap[0]),
            PackedDataset([b], n_chunks=1, block_size=2, seed=6, wrap=wrap[1])]


def test_combined_weights_are_respected(tmp_path):
    weights, n = [0.693584, 0.306416], 10_000
    combined = CombinedDataset(two_sources(tmp_path), seed=42, weights=weights)
    from_first = sum(int(block[0]) < 1000 for block in take(iter(combined), n))
    sigma = (n * weights[0] * weights[1]) ** 0.5
    assert abs(from_first - n * weights[0]) < 4 * sigma
    only_second = CombinedDataset(two_sources(tmp_path), seed=42, weights=[0.0, 1.0])
    assert all(int(block[0]) >= 1000 for block in take(iter(only_second), 200))


def test_combined_is_deterministic_and_resumes(tmp_path):
    def combined(seed=42):
        return CombinedDataset(two_sources(tmp_path), seed=seed, weights=[0.7, 0.3])

    uninterrupted = as_tuples(take(iter(combined()), 3000))  # past a draw batch and several epochs of each source
    assert uninterrupted == as_tuples(take(iter(combined()), 3000))
    assert uninterrupted != as_tuples(take(iter(combined(seed=43)), 3000))
    for k in (0, 1, 29, 1023, 1024, 2500):
        first = combined()
        head = as_tuples(take(iter(first), k))
        path = tmp_path / "state.pt"
        torch.save(first.state_dict(), path)
        resumed = combined()
        resumed.load_state_dict(torch.load(path, weights_only=True))
        assert head + as_tuples(take(iter(resumed), 3000 - k)) == uninterrupted, k


def test_combined_stops_when_a_source_without_wrap_runs_out(tmp_path):
    sources = two_sources(tmp_path, wrap=(False, True), blocks=(20, 10))
    blocks = as_tuples(CombinedDataset(sources, seed=1, weights=[0.5, 0.5]))
    assert sum(block[0] < 1000 for block in blocks) == 20  # the whole of source 0, then the mix stops
    assert 0 < sum(block[0] >= 1000 for block in blocks) < 100  # source 1 wraps: it alone would never stop
    with pytest.raises(ValueError, match="2 weights for 1 datasets"):
        CombinedDataset(sources[:1], seed=1, weights=[0.5, 0.5])
    with pytest.raises(ValueError, match="non-negative"):
        CombinedDataset(sources, seed=1, weights=[-1.0, 2.0])


# ---------------------------------------------------------------- bad input


def test_bad_files_are_named(tmp_path):
    good = litgpt_file(tmp_path / "good.bin", np.arange(8))
    raw = Path(good).read_bytes()
    cases = {
        "truncated.bin": (raw[:-1], "truncated"),
        "longer.bin": (raw + b"\0\0", "truncated or corrupt"),
        "magic.bin": (b"NOTPKDS" + raw[7:], "not a LITPKDS file"),
        "version.bin": (raw[:7] + struct.pack("<Q", 2) + raw[15:], "version 2"),
        "dtype.bin": (raw[:15] + struct.pack("<B", 9) + raw[16:], "dtype code 9"),
        "float.bin": (raw[:15] + struct.pack("<B", 6) + raw[16:], "dtype code 6"),
        "header.bin": (raw[:10], "shorter than the 24-byte header"),
    }
    for name, (content, message) in cases.items():
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=message) as error:
            PackedDataset([good, str(bad)], n_chunks=2, block_size=4)
        assert str(bad) in str(error.value)
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        PackedDataset([good, tmp_path / "missing.bin"], n_chunks=2, block_size=4)
    with pytest.raises(ValueError, match="empty list"):
        PackedDataset([], n_chunks=2, block_size=4)


def test_data_mix_parsing_and_size_weights(data_dir):
    assert parse_data_mix("train_slimpajama:0.693584,train_starcoder:0.306416") == [
        ("train_slimpajama", 0.693584), ("train_starcoder", 0.306416)]
    assert parse_data_mix("a,b") == [("a", None), ("b", None)]
    for bad, message in [("a:1,b", "to every prefix or to none"), ("a:x", "not a number"), ("a:0", "positive"),
                         ("a,,b", "expected")]:
        with pytest.raises(ValueError, match=message):
            parse_data_mix(bad)
    # without weights, every block of every source is equally likely: weights = blocks, counted from the files
    one_process = dict(micro_batch_size=2, seed=0, num_processes=1, process_rank=0)
    combined = training_batches(data_dir, "train_a,train_b", SEQ_LEN + 1, **one_process).dataset
    assert combined.weights == [64, 40]
    with pytest.raises(FileNotFoundError, match="train_c"):
        training_batches(data_dir, "train_a,train_c", SEQ_LEN + 1, **one_process)
