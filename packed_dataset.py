"""The datasets that read packed token shards (LITPKDS, see `shard_format.py`) for pretraining.

Fixed on purpose, compared with lit-gpt: blocks, not files, are shared among ranks and DataLoader workers, so nothing
is dropped when the file count is not a multiple of ranks x workers, and a shard with fewer files than the shuffle
buffer (or a single file) works.

Sharding and order. A file of chunk_size tokens holds chunk_size // block_size non-overlapping blocks, taken from its
start; the tail (and a whole file shorter than block_size) is not read: counted in `n_skipped_tokens` and reported
by `summary()` (an expected loss, so a line of the run's summary, not a warning). Each epoch puts every block of
every file in one global order: without shuffle, file by file in the order given; with shuffle, the files are
shuffled (seed, epoch), taken n_chunks at a time, and the blocks of those n_chunks files are shuffled together
(seed, epoch, window), so at most n_chunks files are open at once.
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

Completeness. training_batches and validation_batches read only shards that a manifest of their directory lists with
their size (see `shard_format.py`): an interrupted preparer run writes none, so its partial shards are refused with
the command to rerun. A run prepared on several nodes counts only with the manifest of every node
(`check_node_sets`). The manifests' vocabulary size and max token id are checked against the model's vocab_size by
`PackedBatches.check_vocabulary`, before the first step.

CombinedDataset draws the source of each block at random with the given weights (TinyLlama: SlimPajama 0.693584,
StarCoder 0.306416), deterministically for a seed; it stops when the drawn source is exhausted (only a source with
wrap=False ever is).
"""

import re
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from shard_format import HDR_SIZE, WRITE_MANIFEST_COMMAND, read_header, read_manifests, uncovered
from utils import UserError

_DRAWS_PER_BATCH = 1024  # CombinedDataset draws its uniforms in batches, each batch seeded by (seed, batch index)


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

        headers = [read_header(name) for name in self.filenames]
        self._dtypes = [dtype for dtype, _ in headers]
        self._chunk_sizes = np.array([chunk_size for _, chunk_size in headers], dtype=np.int64)
        self._blocks_per_file = self._chunk_sizes // block_size
        self._files_with_blocks = np.flatnonzero(self._blocks_per_file)
        self.n_skipped_tokens = int((self._chunk_sizes % block_size).sum())
        self.n_blocks_total = int(self._blocks_per_file.sum())
        if self.n_blocks_total == 0:
            raise UserError(f"None of the {len(self.filenames)} files (the first is {self.filenames[0]!r}) holds a "
                            f"whole block of {block_size} tokens: the largest has {self._chunk_sizes.max()} tokens")
        self.n_blocks = len(range(process_rank, self.n_blocks_total, num_processes))  # this rank's, per epoch
        if self.n_blocks == 0:
            raise UserError(f"{self.n_blocks_total} blocks of {block_size} tokens cannot be shared by "
                            f"{num_processes} processes: rank {process_rank} would get none")
        self._start = 0  # blocks_consumed at which the next iter() starts (set by load_state_dict)
        self._iterator: Optional[PackedDatasetIterator] = None

    def summary(self) -> str:
        """What is read and what is not: "3 files, a.bin ... c.bin, 120 blocks of 257 tokens (30,840 tokens; 461
        tokens at the ends of files fill no block and are not read, 1 of 3 files are shorter than one block)"."""
        first, last = Path(self.filenames[0]).name, Path(self.filenames[-1]).name
        matched = f"1 file, {first}" if len(self.filenames) == 1 else f"{len(self.filenames)} files, {first} ... {last}"
        unread = ""
        if self.n_skipped_tokens:
            n_short = len(self.filenames) - len(self._files_with_blocks)
            unread = f"; {self.n_skipped_tokens:,} tokens at the ends of files fill no block and are not read"
            if n_short:
                unread += f", {n_short} of {len(self.filenames)} files are shorter than one block"
        return (f"{matched}, {self.n_blocks_total:,} blocks of {self.block_size} tokens "
                f"({self.n_blocks_total * self.block_size:,} tokens{unread})")

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
                raise UserError(f"the data position was saved with {key}={state.get(key)!r}, this run's data has "
                                f"{key}={value!r}: it would not continue the same sequence; resume with the --seed, "
                                f"--train_data_mix and data that wrote it")
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
            raise UserError(f"the data position holds {len(state['datasets'])} sources of --train_data_mix, this run "
                            f"has {len(self.datasets)}: resume with the mix that wrote it")
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


SHUFFLE_BUFFER_FILES = 8  # files whose blocks are shuffled together (TinyLlama's n_chunks)


class PackedBatches:
    """A batch source for training.fit: micro-batches of `micro_batch_size` blocks of T + 1 tokens, as
    `(input_ids, targets) = (blocks[:, :-1], blocks[:, 1:])`. Every position is a target and nothing is padding.
    `len()` is the micro-batches per process in one epoch of a single source; the state is the dataset's.
    `manifests`: those that cover the files read (see `covering_manifests`), for check_vocabulary."""

    pad_id = None

    def __init__(self, dataset: Union["CombinedDataset", PackedDataset], micro_batch_size: int,
                 description: str, manifests: Sequence[dict] = ()) -> None:
        self.dataset, self.micro_batch_size, self.description = dataset, micro_batch_size, description
        self.manifests = list(manifests)

    def check_vocabulary(self, vocab_size: int, model: str) -> None:
        """Every token id must be one of the model's `vocab_size` tokens (`model` names the config): a larger id would
        fail inside model.forward, and data of a larger vocabulary was made with another tokenizer."""
        for manifest in self.manifests:
            vocabulary, max_id = manifest.get("vocab_size"), manifest["max_token_id"]
            if max_id >= vocab_size or (vocabulary or 0) > vocab_size:
                recorded = f"a {vocabulary}-token vocabulary" if vocabulary else "an unrecorded vocabulary"
                raise UserError(f"{self.description}: {manifest['path']} records shards of {recorded} with max token "
                                f"id {max_id}, but {model} has vocab_size={vocab_size}: "
                                f"prepare the data with the model's tokenizer, or choose a model whose vocab_size "
                                f"exceeds {max_id}")

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        blocks = iter(self.dataset)
        while True:
            try:
                batch = torch.stack([next(blocks) for _ in range(self.micro_batch_size)])
            except StopIteration:  # a source without wrap is exhausted
                return
            yield batch[:, :-1], batch[:, 1:]

    def __len__(self) -> int:
        sources = self.dataset.datasets if isinstance(self.dataset, CombinedDataset) else [self.dataset]
        if len(sources) != 1:
            raise UserError(f"--epochs needs a single training source; {self.description} mixes {len(sources)}")
        return sources[0].n_blocks_total // sources[0].num_processes // self.micro_batch_size

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)


def training_batches(data_dir: Path, mix: str, block_size: int, micro_batch_size: int, seed: int,
                     num_processes: int, process_rank: int) -> PackedBatches:
    """The files data_dir/prefix* of each source of `mix` (see parse_data_mix), shuffled, endless, mixed. Rank 0
    prints which files each prefix matched: a prefix also matches longer names (train_code: train_code_extra_*)."""
    sources = parse_data_mix(mix)
    in_directory = read_manifests(data_dir)  # once: every source is in data_dir
    datasets, manifests = [], {}  # by path: the sources of one directory share its manifests
    for prefix, _ in sources:
        files = data_files(data_dir, prefix, "--train_data_dir/--train_data_mix")
        manifests.update((manifest["path"], manifest) for manifest in covering_manifests(data_dir, files, in_directory))
        dataset = PackedDataset(files, n_chunks=SHUFFLE_BUFFER_FILES, block_size=block_size, seed=seed, shuffle=True,
                                wrap=True, num_processes=num_processes, process_rank=process_rank)
        if process_rank == 0:
            print(f"--train_data_mix {prefix!r}: {dataset.summary()}")
        datasets.append(dataset)
    weights = [weight for _, weight in sources]
    if weights[0] is None:  # every block of every source equally likely
        weights = [dataset.n_blocks_total for dataset in datasets]
    return PackedBatches(CombinedDataset(datasets, seed=seed, weights=weights), micro_batch_size,
                         f"--train_data_mix {mix!r}", list(manifests.values()))


def validation_batches(data_dir: Path, block_size: int, micro_batch_size: int, num_processes: int,
                       process_rank: int, flag: str = "--val_data_dir") -> PackedBatches:
    """The files data_dir/validation*, in order; each iter() starts from the beginning. `flag` names data_dir in
    errors."""
    files = data_files(data_dir, "validation", flag)
    manifests = covering_manifests(data_dir, files, read_manifests(data_dir))
    dataset = PackedDataset(files, n_chunks=SHUFFLE_BUFFER_FILES, block_size=block_size, shuffle=False,
                            num_processes=num_processes, process_rank=process_rank)
    return PackedBatches(dataset, micro_batch_size, f"--val_data_dir {data_dir}", manifests)


def parse_data_mix(mix: str) -> list:
    """"prefix:weight,prefix:weight" or "prefix,prefix" -> [(prefix, weight or None)]."""
    entries = []
    for item in mix.split(","):
        prefix, _, weight = item.strip().partition(":")
        if not prefix:
            raise UserError(f"--train_data_mix {mix!r}: expected 'prefix:weight,...' or 'prefix,...'")
        try:
            entries.append((prefix, float(weight) if weight else None))
        except ValueError:
            raise UserError(f"--train_data_mix {mix!r}: the weight {weight!r} of {prefix!r} is not a number") from None
    if len({weight is None for _, weight in entries}) > 1:
        raise UserError(f"--train_data_mix {mix!r}: give a weight to every prefix or to none (then by size)")
    if any(weight is not None and weight <= 0 for _, weight in entries):
        raise UserError(f"--train_data_mix {mix!r}: weights must be positive")
    return entries


def data_files(data_dir: Path, prefix: str, flag: str) -> list:
    files = sorted(str(path) for path in Path(data_dir).glob(f"{prefix}*") if path.is_file())
    if not files:
        raise FileNotFoundError(f"No data files {str(Path(data_dir) / prefix)}* (from {flag}): prepare the data with "
                                f"a script of prepare_data/ first")
    return files


def covering_manifests(data_dir: Path, files: Sequence[str], manifests: List[dict]) -> List[dict]:
    """Those of data_dir's `manifests` that list `files`; a file that none lists with its current size is refused,
    with the preparer command to rerun (its run did not finish) and the command for shards made elsewhere."""
    missing = uncovered(files, manifests)
    if missing is not None:
        path, why = missing
        raise UserError(f"{path} {why}: the preparer run that wrote it did not finish (interrupted or killed) "
                        f"or the file changed since. "
                        f"Continue that run ({rerun_command(path)}), or remove its shards and run it again; for shards "
                        f"made elsewhere (lit-gpt's, TinyLlama's), run {WRITE_MANIFEST_COMMAND} {data_dir}")
    names = {Path(f).name for f in files}
    covering = [m for m in manifests if names & m["files"].keys()]
    check_node_sets(data_dir, covering, manifests)
    return covering


def check_node_sets(data_dir: Path, covering: List[dict], manifests: List[dict]) -> None:
    """A preparer run on N nodes wrote one manifest per node (shard_format.write_manifest): refuse a run of which
    `covering` holds some and data_dir's `manifests` not all (a node that never finished, named), or that is mixed
    with a run on another number of nodes or of other input files."""
    for run in sorted({m["run"] for m in covering if m.get("run")}):
        nodes = [m for m in manifests if m.get("run") == run]
        counts = sorted({m.get("num_nodes", 1) for m in nodes})
        if len(counts) > 1:
            raise UserError(f"{data_dir} holds manifests of {run} from runs on {' and '.join(map(str, counts))} "
                            f"nodes ({', '.join(Path(m['path']).name for m in nodes)}): their shards would be read "
                            f"twice; remove one run's shards and manifests")
        num_nodes = counts[0]
        missing = sorted(set(range(num_nodes)) - {m.get("node_rank", 0) for m in nodes})
        if missing:
            ranks = ", ".join(map(str, missing))
            raise UserError(f"{data_dir}: {run} was prepared on {num_nodes} nodes, but node {ranks} wrote no manifest "
                            f"(manifest_{run}_node{missing[0]}.json): its preparation did not finish. Rerun it there "
                            f"with --num_nodes {num_nodes} --node_rank {missing[0]} --resume")
        if len({m.get("inputs_sha256") for m in nodes}) > 1:
            raise UserError(f"{data_dir}: the {num_nodes} nodes that prepared {run} were given different input files "
                            f"(their manifests' inputs_sha256 differ), so their shares may overlap or miss files: "
                            f"prepare it again with the same --source_path contents on every node")


def rerun_command(path: Path) -> str:
    """The preparer command that writes shards named as `path` ({split}_{name}_{process}_{counter}.bin, or
    {split}_{name}_node{R}_{process}_{counter}.bin), continuing the interrupted run."""
    match = re.fullmatch(r"(train|validation)_(.+?)(?:_node(\d+))?_\d+_\d{10}\.bin", path.name)
    if match is None:
        return "the preparer command that wrote it"
    split, name, node = match.groups()
    flags = f"{'' if node is None else f' --node_rank {node}'} --resume"
    if name in ("slimpajama", "starcoder"):
        return f"python prepare_data/prepare_{name}.py --split {split} --destination_path {path.parent}{flags} ..."
    if name in ("code", "prose") and path.parent.name == split:
        return f"python prepare_data/prepare_demo.py --destination_path {path.parent.parent}"
    return f"python prepare_data/prepare_text.py --name {name} --destination_path {path.parent}{flags} ..."
