"""Packed token shards in lit-gpt's LITPKDS v1 format, and the datasets that read them for pretraining.

File format, byte-compatible with lit-gpt / TinyLlama: a 24-byte header, b"LITPKDS" + version (uint64 LE, = 1) +
dtype code (uint8, a key of DTYPES: 8 = uint16, 4 = int32) + chunk size in tokens (uint64 LE), then exactly
chunk_size tokens. Files are named `{prefix}_{counter:010d}.bin`. Full chunks are identical to lit-gpt's, and
lit-gpt's files read here.

Fixed on purpose, compared with the original:
- No padding. lit-gpt filled the last, partial chunk up with a separator token (BOS in TinyLlama), and models learned
  to emit runs of <s> (TinyLlama issue #83). Here the builder's last file is shorter instead: its header carries its
  real token count, and the reader reads every file's own header, so no fake token can be read as data.
- Every file's header is checked (magic, version, dtype code, file size = 24 + chunk_size * itemsize), not only the
  first one's: a truncated or foreign file is an error that names it.
- Blocks, not files, are shared among ranks and DataLoader workers, so nothing is dropped when the file count is not
  a multiple of ranks x workers, and a shard with fewer files than the shuffle buffer (or a single file) works.

Sharding and order. A file of chunk_size tokens holds chunk_size // block_size non-overlapping blocks, taken from its
start; the tail (and a whole file shorter than block_size) is not read: counted in `n_skipped_tokens` and reported
once with a warning. Each epoch puts every block of every file in one global order: without shuffle, file by file in
the order given; with shuffle, the files are shuffled (seed, epoch), taken n_chunks at a time, and the blocks of
those n_chunks files are shuffled together (seed, epoch, window), so at most n_chunks files are open at once.
Rank r takes the positions r, r + P, r + 2P, ... of that order (P = num_processes): every block is read exactly once
per epoch, and the ranks get n or n + 1 blocks each (`n_blocks` is this rank's count). Pretraining uses wrap=True,
so a rank never runs dry; validation should average per-rank sums and counts. Every rank must pass the same
filenames in the same order and the same seed. Inside a torch DataLoader with num_workers = W > 0, the workers take
turns along their rank's stream (worker w takes the items start + w, start + w + W, ... of each epoch), so the rank's
blocks are the same with or without workers; the DataLoader, which asks the workers in turn, even yields them in the
same order with batch_size=None or 1 within an epoch.

Resuming. `state_dict()` counts the blocks this rank has consumed since the start of training (`blocks_consumed`,
over all epochs); `load_state_dict` makes the next iter() continue right after the last block yielded, by
recomputing that epoch's order from the seed (no replay). Ranks step in lockstep, so rank 0's state is valid on every
rank. The state is exact with num_workers=0, which is what pretraining uses; with workers, the main process sees no
worker's position, and a loaded state only tells the workers where the rank's stream starts.

CombinedDataset draws the source of each block at random with the given weights (TinyLlama: SlimPajama 0.693584,
StarCoder 0.306416), deterministically for a seed; it stops when the drawn source is exhausted (only a source with
wrap=False ever is).
"""

import os
import struct
import warnings
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from utils import atomic_write

HDR_MAGIC = b"LITPKDS"
HDR_SIZE = 24  # bytes
HDR_VERSION = 1
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float32, 7: np.float64, 8: np.uint16}
TOKEN_DTYPE_CODES = (1, 2, 3, 4, 5, 8)  # token ids are integers: codes 6 and 7 (floats) are refused
_HEADER = struct.Struct("<7sQBQ")  # magic, version, dtype code, chunk size: 7 + 8 + 1 + 8 = 24 bytes, no padding
_DRAWS_PER_BATCH = 1024  # CombinedDataset draws its uniforms in batches, each batch seeded by (seed, batch index)


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id of the vocabulary fits (vocab_size <= 65536), else int32."""
    if not 1 <= vocab_size <= 2**31:
        raise ValueError(f"vocab_size must be in [1, 2**31], got {vocab_size}")
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.int32)


def token_dtype(vocab_size: int, dtype: Optional[np.dtype] = None) -> np.dtype:
    """`dtype` checked to be a LITPKDS token dtype that holds every id of the vocabulary; None: dtype_for_vocab."""
    if dtype is None:
        return dtype_for_vocab(vocab_size)
    dtype = np.dtype(dtype)
    _dtype_code(dtype)
    if vocab_size - 1 > np.iinfo(dtype).max:
        raise ValueError(f"vocab_size {vocab_size} does not fit dtype {dtype.name} "
                         f"(max id {np.iinfo(dtype).max}); use {dtype_for_vocab(vocab_size).name}")
    return dtype


def _dtype_code(dtype: np.dtype) -> int:
    for code in TOKEN_DTYPE_CODES:
        if np.dtype(DTYPES[code]) == dtype:
            return code
    raise ValueError(f"dtype {dtype} is not a LITPKDS token dtype; use one of "
                     f"{[np.dtype(DTYPES[code]).name for code in TOKEN_DTYPE_CODES]}")


def _read_header(path: str) -> Tuple[np.dtype, int]:
    """Check one file's header and size; return its token dtype and chunk size (in tokens)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Packed data file {path!r} does not exist")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        header = f.read(HDR_SIZE)
    if len(header) < HDR_SIZE:
        raise ValueError(f"{path!r} is not a LITPKDS file: {size} bytes, shorter than the {HDR_SIZE}-byte header")
    magic, version, code, chunk_size = _HEADER.unpack(header)
    if magic != HDR_MAGIC:
        raise ValueError(f"{path!r} is not a LITPKDS file: it starts with {magic!r}, expected {HDR_MAGIC!r}")
    if version != HDR_VERSION:
        raise ValueError(f"{path!r} has LITPKDS version {version}, only version {HDR_VERSION} is supported")
    if code not in TOKEN_DTYPE_CODES:
        raise ValueError(f"{path!r} has dtype code {code}, expected a token dtype code {TOKEN_DTYPE_CODES} "
                         f"(8 = uint16, 4 = int32)")
    dtype = np.dtype(DTYPES[code])
    expected = HDR_SIZE + chunk_size * dtype.itemsize
    if size != expected:
        raise ValueError(f"{path!r} is {size} bytes, but its header says {chunk_size} {dtype.name} tokens "
                         f"({expected} bytes): the file is truncated or corrupt")
    return dtype, chunk_size


class PackedDatasetBuilder:
    """Streams token arrays in and writes every `chunk_size` tokens as one LITPKDS file, atomically."""

    def __init__(self, outdir: Union[str, Path], prefix: str, chunk_size: int, vocab_size: int,
                 dtype: Optional[np.dtype] = None) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1 token, got {chunk_size}")
        self.dtype = token_dtype(vocab_size, dtype)
        self._code = _dtype_code(self.dtype)
        self.outdir = Path(outdir)
        self.outdir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.chunk_size = chunk_size
        self.vocab_size = vocab_size
        self.filenames: list = []
        self.n_tokens = 0
        self._buffer = np.empty(chunk_size, dtype=self.dtype)
        self._filled = 0

    def add_array(self, arr: np.ndarray) -> None:
        """Append token ids; every chunk that fills up is written as a file at once."""
        arr = np.asarray(arr).reshape(-1)
        if arr.size == 0:
            return
        if arr.dtype.kind not in "iu":
            raise TypeError(f"token ids must be integers, got an array of {arr.dtype}")
        low, high = int(arr.min()), int(arr.max())
        if low < 0 or high >= self.vocab_size:
            raise ValueError(f"token id {low if low < 0 else high} is out of range: ids must be in "
                             f"[0, {self.vocab_size - 1}] (vocab_size {self.vocab_size}, dtype {self.dtype.name}, "
                             f"whose max id is {np.iinfo(self.dtype).max})")
        start = 0
        while start < arr.size:
            n = min(self.chunk_size - self._filled, arr.size - start)
            self._buffer[self._filled:self._filled + n] = arr[start:start + n]
            self._filled += n
            start += n
            if self._filled == self.chunk_size:
                self._write_chunk()
        self.n_tokens += arr.size

    def finish(self) -> list:
        """Write the last, partial chunk with its real token count as chunk size (never padded); return all files."""
        if self._filled:
            self._write_chunk()
        return list(self.filenames)

    def _write_chunk(self) -> None:
        path = self.outdir / f"{self.prefix}_{len(self.filenames):010d}.bin"
        with atomic_write(path) as tmp, open(tmp, "wb") as f:
            f.write(_HEADER.pack(HDR_MAGIC, HDR_VERSION, self._code, self._filled))
            f.write(self._buffer[:self._filled])
        self.filenames.append(str(path))
        self._filled = 0


class PackedDataset(IterableDataset):
    """Yields int64 tensors of `block_size` tokens from LITPKDS files (see the module docstring for the order)."""

    def __init__(self, filenames: Sequence[Union[str, Path]], n_chunks: int, block_size: int, seed: int = 12345,
                 shuffle: bool = True, wrap: bool = False, num_processes: int = 1, process_rank: int = 0) -> None:
        self.filenames = [str(name) for name in filenames]
        if not self.filenames:
            raise ValueError("PackedDataset got an empty list of files")
        if n_chunks < 1 or block_size < 1:
            raise ValueError(f"n_chunks and block_size must be at least 1, got {n_chunks} and {block_size}")
        if seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        if not 0 <= process_rank < num_processes:
            raise ValueError(f"process_rank must be in [0, num_processes={num_processes}), got {process_rank}")
        self.n_chunks, self.block_size, self.seed = n_chunks, block_size, seed
        self.shuffle, self.wrap = shuffle, wrap
        self.num_processes, self.process_rank = num_processes, process_rank

        headers = [_read_header(name) for name in self.filenames]
        self._dtypes = [dtype for dtype, _ in headers]
        self._chunk_sizes = np.array([chunk_size for _, chunk_size in headers], dtype=np.int64)
        self._blocks_per_file = self._chunk_sizes // block_size
        self._files_with_blocks = np.flatnonzero(self._blocks_per_file)
        self.n_skipped_tokens = int((self._chunk_sizes % block_size).sum())
        self.n_blocks_total = int(self._blocks_per_file.sum())
        if self.n_blocks_total == 0:
            raise ValueError(f"None of the {len(self.filenames)} files (the first is {self.filenames[0]!r}) holds a "
                             f"whole block of {block_size} tokens: the largest has {self._chunk_sizes.max()} tokens")
        if self.n_skipped_tokens:
            n_empty = len(self.filenames) - len(self._files_with_blocks)
            warnings.warn(f"{self.n_skipped_tokens} tokens are not read: they do not fill a whole block of "
                          f"{block_size} tokens at the end of a file ({n_empty} of {len(self.filenames)} files are "
                          f"shorter than one block)")
        self.n_blocks = len(range(process_rank, self.n_blocks_total, num_processes))  # this rank's, per epoch
        if self.n_blocks == 0:
            raise ValueError(f"{self.n_blocks_total} blocks of {block_size} tokens cannot be shared by "
                             f"{num_processes} processes: rank {process_rank} would get none")
        self._start = 0  # blocks_consumed at which the next iter() starts (set by load_state_dict)
        self._iterator: Optional[PackedDatasetIterator] = None

    def __iter__(self) -> "PackedDatasetIterator":
        worker = get_worker_info()
        worker_id, num_workers = (0, 1) if worker is None else (worker.id, worker.num_workers)
        self._iterator = PackedDatasetIterator(self._blocks(self._start, worker_id, num_workers), self._start)
        self._start = 0
        return self._iterator

    def __getstate__(self) -> dict:
        # a live iterator (a generator over memmaps) cannot be sent to a DataLoader worker process
        return {**self.__dict__, "_iterator": None}

    def state_dict(self) -> dict:
        consumed = self._start if self._iterator is None else self._iterator.blocks_consumed
        return {"blocks_consumed": consumed, "epoch": consumed // self.n_blocks, **self._identity()}

    def load_state_dict(self, state: dict) -> None:
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise ValueError(f"PackedDataset state was saved with {key}={state.get(key)!r}, this dataset has "
                                 f"{key}={value!r}: it would not continue the same sequence")
        self._start = int(state["blocks_consumed"])
        self._iterator = None

    def _identity(self) -> dict:
        # what a saved position refers to; `epoch` in the state is derived from blocks_consumed, for logs
        return {"n_blocks_total": self.n_blocks_total, "num_processes": self.num_processes, "seed": self.seed,
                "shuffle": self.shuffle}

    def _blocks(self, start: int, worker_id: int, num_workers: int) -> Iterator[Tuple[int, torch.Tensor]]:
        """(this rank's stream position, block) from position `start` on, for one DataLoader worker."""
        if self.wrap and worker_id >= self.n_blocks:
            raise ValueError(f"DataLoader worker {worker_id} of rank {self.process_rank} gets none of the rank's "
                             f"{self.n_blocks} blocks: use at most {self.n_blocks} workers")
        epoch, index = divmod(start, self.n_blocks)
        if epoch > 0 and not self.wrap:
            return
        while True:
            first = index + worker_id  # workers take turns, as the DataLoader asks them for items
            for index_in_epoch, block in self._epoch_blocks(epoch, first, num_workers):
                yield epoch * self.n_blocks + index_in_epoch, block
            if not self.wrap:
                return
            epoch, index = epoch + 1, 0

    def _epoch_blocks(self, epoch: int, first: int, step: int) -> Iterator[Tuple[int, torch.Tensor]]:
        """This rank's blocks first, first + step, ... of `epoch`, with their index in the rank's epoch."""
        files = self._files_with_blocks
        if self.shuffle:
            files = np.random.default_rng([self.seed, epoch, 0]).permutation(files)
        windows = [files[i:i + self.n_chunks] for i in range(0, len(files), self.n_chunks)]
        sizes = np.array([self._blocks_per_file[window].sum() for window in windows])
        window_ends = np.cumsum(sizes)
        # this rank's index j is the global position process_rank + num_processes * j
        position, stride = self.process_rank + self.num_processes * first, self.num_processes * step
        for k in range(int(np.searchsorted(window_ends, position, side="right")), len(windows)):
            window_start = window_ends[k] - sizes[k]
            picks = np.arange(position - window_start, sizes[k], stride)
            position += len(picks) * stride
            if len(picks) == 0:
                continue
            indices_in_epoch = (window_start + picks - self.process_rank) // self.num_processes
            if self.shuffle:
                picks = np.random.default_rng([self.seed, epoch, 1, k]).permutation(sizes[k])[picks]
            counts = self._blocks_per_file[windows[k]]
            file_ends = np.cumsum(counts)
            which = np.searchsorted(file_ends, picks, side="right")
            blocks_in_file = picks - (file_ends[which] - counts[which])
            memmaps = {}  # this window's files only
            for index_in_epoch, w, b in zip(indices_in_epoch.tolist(), which.tolist(), blocks_in_file.tolist()):
                f = int(windows[k][w])
                if f not in memmaps:
                    memmaps[f] = np.memmap(self.filenames[f], dtype=self._dtypes[f], mode="r", offset=HDR_SIZE,
                                           shape=(int(self._chunk_sizes[f]),))
                tokens = memmaps[f][b * self.block_size:(b + 1) * self.block_size]
                yield index_in_epoch, torch.from_numpy(tokens.astype(np.int64))


class PackedDatasetIterator:
    """One iteration of a PackedDataset; `blocks_consumed` is the rank's stream position after the last block."""

    def __init__(self, blocks: Iterator[Tuple[int, torch.Tensor]], blocks_consumed: int) -> None:
        self._blocks = blocks
        self.blocks_consumed = blocks_consumed

    def __iter__(self) -> "PackedDatasetIterator":
        return self

    def __next__(self) -> torch.Tensor:
        position, block = next(self._blocks)
        self.blocks_consumed = position + 1
        return block


class CombinedDataset(IterableDataset):
    """Draws each block from one of `datasets` at random with probabilities proportional to `weights`."""

    def __init__(self, datasets: list, seed: int, weights: Optional[list] = None) -> None:
        if not datasets:
            raise ValueError("CombinedDataset got an empty list of datasets")
        weights = [1.0] * len(datasets) if weights is None else list(weights)
        if len(weights) != len(datasets):
            raise ValueError(f"CombinedDataset got {len(weights)} weights for {len(datasets)} datasets")
        if min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"CombinedDataset weights must be non-negative with a positive sum, got {weights}")
        if seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        self.datasets, self.seed, self.weights = list(datasets), seed, weights
        self._draws = 0  # draws at which the next iter() starts (set by load_state_dict)
        self._iterator: Optional[CombinedDatasetIterator] = None

    def __iter__(self) -> "CombinedDatasetIterator":
        self._iterator = CombinedDatasetIterator(self.datasets, self.seed, self.weights, self._draws)
        self._draws = 0
        return self._iterator

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_iterator": None}

    def state_dict(self) -> dict:
        draws = self._draws if self._iterator is None else self._iterator.draws
        return {"draws": draws, "datasets": [dataset.state_dict() for dataset in self.datasets]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["datasets"]) != len(self.datasets):
            raise ValueError(f"CombinedDataset state holds {len(state['datasets'])} datasets, "
                             f"this one has {len(self.datasets)}")
        for dataset, dataset_state in zip(self.datasets, state["datasets"]):
            dataset.load_state_dict(dataset_state)
        self._draws = int(state["draws"])
        self._iterator = None


class CombinedDatasetIterator:
    """Draw number i uses uniform i % 1024 of a batch seeded by (seed, i // 1024), so a draw count is its RNG state."""

    def __init__(self, datasets: list, seed: int, weights: list, draws: int) -> None:
        self._sources = [iter(dataset) for dataset in datasets]
        self._seed = seed
        cumulative = np.cumsum(np.asarray(weights, dtype=np.float64))
        self._thresholds = cumulative / cumulative[-1]  # ends at exactly 1.0, above every uniform in [0, 1)
        self.draws = draws
        self._batch, self._uniforms = -1, np.empty(0)

    def __iter__(self) -> "CombinedDatasetIterator":
        return self

    def __next__(self) -> torch.Tensor:
        batch, i = divmod(self.draws, _DRAWS_PER_BATCH)
        if batch != self._batch:
            self._batch, self._uniforms = batch, np.random.default_rng([self._seed, batch]).random(_DRAWS_PER_BATCH)
        source = int(np.searchsorted(self._thresholds, self._uniforms[i], side="right"))
        block = next(self._sources[source])  # an exhausted source ends the mix
        self.draws += 1
        return block
