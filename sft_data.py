"""The on-disk format of prepared instruction (SFT) data: tokenized examples with a per-token loss mask.

A data directory holds, per split (`train`, `val`):
    {split}_ids.npy      uint32 (N_tokens,): every example's token ids, concatenated
    {split}_mask.npy     bool (N_tokens,): True where the token is a target (the model is trained to predict it)
    {split}_offsets.npy  int64 (N_examples + 1,): example i is ids[offsets[i]:offsets[i + 1]]
and `sft_metadata.json`: the chat template (and its sha256) the examples were rendered with, the tokenizer (file
name, sha256, vocab_size), max_seq_length (the most ids of an example), the preparation's settings, per-split
counts and what was skipped, by reason. prepare_data/prepare_sft.py writes it.

The mask is per token: the model is trained on input ids[:-1] with targets ids[1:], each ignored (-100) where
mask[1:] is False; mask[0] is never used. numpy only: data preparation never imports torch.
"""

import hashlib
from pathlib import Path
from typing import Iterable, List, Tuple, Union

import numpy as np

from utils import UserError, atomic_write, read_json, write_json

FORMAT = "small-llama-sft/1"
METADATA_FILE = "sft_metadata.json"
# the requests of a demo's val split as text (prepare_data/prepare_sft_demo.py): what finetune/demo.py asks
HELD_OUT_FILE = "held_out_requests.json"
SPLITS = ("train", "val")


def template_sha256(template: str) -> str:
    """The sha256 of a template's source, as `chat_template.ChatTemplate.sha256` and the metadata record it."""
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


def write_split(data_dir: Union[str, Path], split: str, examples: Iterable[Tuple[List[int], List[bool]]]) -> dict:
    """Write one split's examples, each (token ids, loss mask) of equal length, atomically; returns its counts."""
    data_dir = Path(data_dir)
    ids, masks, offsets = [], [], [0]
    for i, (example_ids, example_mask) in enumerate(examples):
        if len(example_ids) != len(example_mask):
            raise ValueError(f"example {i} of {split!r} has {len(example_ids)} ids but a mask of {len(example_mask)}")
        ids.append(np.asarray(example_ids, dtype=np.uint32))
        masks.append(np.asarray(example_mask, dtype=bool))
        offsets.append(offsets[-1] + len(example_ids))
    arrays = {
        "ids": np.concatenate(ids) if ids else np.zeros(0, np.uint32),
        "mask": np.concatenate(masks) if masks else np.zeros(0, bool),
        "offsets": np.asarray(offsets, dtype=np.int64),
    }
    for name, array in arrays.items():
        with atomic_write(data_dir / f"{split}_{name}.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, array)
    return {"examples": len(offsets) - 1, "tokens": int(offsets[-1]), "target_tokens": int(arrays["mask"].sum())}


def write_metadata(data_dir: Union[str, Path], metadata: dict) -> None:
    """Written last, after every split: a directory without it is incomplete and is refused by `read_metadata`."""
    if "format" in metadata:
        raise ValueError("the metadata key 'format' is reserved for the version of this file format")
    write_json(Path(data_dir) / METADATA_FILE, {"format": FORMAT, **metadata})


def read_metadata(data_dir: Union[str, Path]) -> dict:
    path = Path(data_dir) / METADATA_FILE
    if not path.is_file():
        raise UserError(f"{str(data_dir)!r} has no {METADATA_FILE}: it is not prepared SFT data (or its preparation "
                        "did not finish); run prepare_data/prepare_sft.py")
    metadata = read_json(path, "the metadata of prepared SFT data")
    if metadata.get("format") != FORMAT:
        raise UserError(f"{path} has format {metadata.get('format')!r}; this version reads {FORMAT!r}")
    return metadata


class SFTSplit:
    """One split's examples, memory-mapped: `split[i]` is (ids int64 (T,), loss mask bool (T,))."""

    def __init__(self, data_dir: Union[str, Path], split: str) -> None:
        data_dir = Path(data_dir)
        paths = {name: data_dir / f"{split}_{name}.npy" for name in ("ids", "mask", "offsets")}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise UserError(f"SFT data in {str(data_dir)!r} lacks {missing}; rerun prepare_data/prepare_sft.py")
        self.ids = np.load(paths["ids"], mmap_mode="r")
        self.mask = np.load(paths["mask"], mmap_mode="r")
        self.offsets = np.load(paths["offsets"])
        if len(self.ids) != len(self.mask) or self.offsets[-1] != len(self.ids):
            raise UserError(f"SFT data in {str(data_dir)!r}: {split} ids, mask and offsets disagree in length; "
                            "rerun prepare_data/prepare_sft.py")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        start, end = self.offsets[i], self.offsets[i + 1]
        return self.ids[start:end].astype(np.int64), np.array(self.mask[start:end])

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)
