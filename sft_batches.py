"""The batch source of instruction finetuning (training.BatchSource): prepared SFT examples (sft_data.py's format)
as padded or packed micro-batches with their loss targets; the SFT twin of packed_dataset.PackedBatches."""

from typing import Iterator, Optional, Tuple

import numpy as np
import torch

from model import Config
from sft_data import SFTSplit
from training import IGNORE_INDEX


def padding_id(config: Config) -> int:
    """The input id of padding: the first row of the embedding past the vocabulary when there is one (no token has
    that id, so the token counts are exact), else 0. Either way no loss is taken there and no token attends it."""
    return config.vocab_size if config.padded_vocab_size > config.vocab_size else 0


class SFTBatches:
    """A batch source (training.BatchSource) over one split of prepared SFT examples.

    An example of ids (L,) and loss mask (L,) is the input ids[:-1] with targets ids[1:], -100 where the mask is
    False. A row is one example, or with `packing_length` several (next-fit in a seeded order, up to that many
    tokens, fixed once), yielded with document ids so that each attends only itself. A micro-batch is
    `micro_batch_size` rows right-padded to its longest (inputs `pad_id`, targets -100).

    train: rows shuffled per epoch (seed, epoch), endless, resumable (state_dict: the epoch and the position in it);
    each epoch takes a whole number of steps of `rows_per_step` rows, so a step's rows do not depend on the
    micro-batch size or the number of processes; process r takes micro-batches r, r + P, ... of that order.
    Otherwise (validation): every row in order, one pass per iter(), the last micro-batches filled up with empty
    rows (padding only, no target), so that the validation loss is the same whatever the micro-batch size and the
    number of processes. len() is the micro-batches per process in one epoch.
    """

    def __init__(self, split: SFTSplit, micro_batch_size: int, pad_id: int, num_processes: int, process_rank: int,
                 seed: int, train: bool, rows_per_step: int = 1, packing_length: Optional[int] = None) -> None:
        self.split, self.micro_batch_size, self.pad_id = split, micro_batch_size, pad_id
        self.num_processes, self.process_rank, self.seed, self.train = num_processes, process_rank, seed, train
        self.packing = packing_length is not None
        self.unit = "rows of packed examples" if self.packing else "examples"
        usable = np.flatnonzero(split.lengths() >= 2)  # an input and a target at least
        self.rows = pack(usable, split.lengths() - 1, packing_length, seed) if self.packing else usable[:, None]
        self.n_rows = len(self.rows)
        per_micro_batch = micro_batch_size * num_processes
        self.rows_per_epoch = (self.n_rows // rows_per_step * rows_per_step if train
                               else -(-self.n_rows // per_micro_batch) * per_micro_batch)
        self.epoch, self.position = 0, 0

    def __len__(self) -> int:
        return self.rows_per_epoch // (self.micro_batch_size * self.num_processes)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, ...]]:
        if not self.train:
            yield from (self.micro_batch(np.arange(self.rows_per_epoch), i) for i in range(len(self)))
            return
        while True:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_rows)
            while self.position < len(self):
                self.position += 1  # before the yield: a checkpoint taken after this batch continues past it
                yield self.micro_batch(order, self.position - 1)
            self.epoch, self.position = self.epoch + 1, 0

    def micro_batch(self, order: np.ndarray, index: int) -> Tuple[torch.Tensor, ...]:
        """This process's micro-batch `index` of the epoch: (input_ids, targets[, document_ids]), each (B, T)."""
        first = (index * self.num_processes + self.process_rank) * self.micro_batch_size
        rows = [[self.example(i) for i in self.rows[row] if i >= 0] if row < self.n_rows else []  # -1: no example
                for row in order[first:first + self.micro_batch_size]]
        T = max(1, *(sum(len(inputs) for inputs, _ in row) for row in rows))
        input_ids = torch.full((len(rows), T), self.pad_id, dtype=torch.int64)
        targets = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.int64)
        document_ids = torch.zeros((len(rows), T), dtype=torch.int64)
        for b, row in enumerate(rows):
            start = 0
            for document, (inputs, example_targets) in enumerate(row):
                end = start + len(inputs)
                input_ids[b, start:end], targets[b, start:end] = inputs, example_targets
                document_ids[b, start:end] = document
                start = end
            document_ids[b, start:] = len(row)  # the padding: a document of its own
        return (input_ids, targets, document_ids) if self.packing else (input_ids, targets)

    def example(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.split[i]
        targets = np.where(mask[1:], ids[1:], IGNORE_INDEX)
        return torch.from_numpy(ids[:-1]), torch.from_numpy(targets)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


def pack(examples: np.ndarray, input_lengths: np.ndarray, packing_length: int, seed: int) -> np.ndarray:
    """Rows of example indices (n_rows, most per row), -1 past a row's last: next-fit of `examples` in a seeded
    order into rows of at most `packing_length` input tokens."""
    rows, row, used = [], [], 0
    for i in np.random.default_rng(seed).permutation(examples):
        if row and used + input_lengths[i] > packing_length:
            rows.append(row)
            row, used = [], 0
        row.append(int(i))
        used += int(input_lengths[i])
    if row:
        rows.append(row)
    packed = np.full((len(rows), max((len(r) for r in rows), default=1)), -1, dtype=np.int64)
    for n, row in enumerate(rows):
        packed[n, :len(row)] = row
    return packed
