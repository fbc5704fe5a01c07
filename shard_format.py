"""lit-gpt's LITPKDS v1 shard format: its header, its token dtypes, and the builder that writes shards. numpy only,
so data preparation never imports torch; `packed_dataset.py` reads these files for pretraining.

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

Manifests. A complete set of shards is one whose directory holds a manifest listing it (`manifest*.json`: each file's
name, size in bytes and token count, the max token id, the tokenizer's vocabulary size and SHA-256 when known).
Each preparer run writes `manifest_{run}.json` last, so an interrupted run leaves shards that no manifest covers;
on several nodes each node writes its own (`manifest_{run}_node{R}.json`, recording num_nodes and node_rank).
`prepare_data/write_manifest.py` writes `manifest.json` for shards made elsewhere, after scanning them.

Resuming. `PackedDatasetBuilder.sync` makes the tokens added so far durable (the open chunk's in a hidden
`.{prefix}_{counter}.open` file) and returns the position; `PackedDatasetBuilder.resume` continues from it.
"""

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from utils import UserError, atomic_write, write_json

HDR_MAGIC = b"LITPKDS"
HDR_SIZE = 24  # bytes
HDR_VERSION = 1
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float32, 7: np.float64, 8: np.uint16}
TOKEN_DTYPE_CODES = (1, 2, 3, 4, 5, 8)  # token ids are integers: codes 6 and 7 (floats) are refused
_HEADER = struct.Struct("<7sQBQ")  # magic, version, dtype code, chunk size: 7 + 8 + 1 + 8 = 24 bytes, no padding
MANIFEST_PATTERN = "manifest*.json"
SCANNED_MANIFEST = "manifest.json"  # what write_manifest.py writes
WRITE_MANIFEST_COMMAND = "python prepare_data/write_manifest.py --directory"


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


def read_header(path: str) -> Tuple[np.dtype, int]:
    """Check one file's header and size; return its token dtype and chunk size (in tokens)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Packed data file {path!r} does not exist")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        header = f.read(HDR_SIZE)
    if len(header) < HDR_SIZE:
        raise UserError(f"{path!r} is not a LITPKDS file: {size} bytes, shorter than the {HDR_SIZE}-byte header")
    magic, version, code, chunk_size = _HEADER.unpack(header)
    if magic != HDR_MAGIC:
        raise UserError(f"{path!r} is not a LITPKDS file: it starts with {magic!r}, expected {HDR_MAGIC!r}")
    if version != HDR_VERSION:
        raise UserError(f"{path!r} has LITPKDS version {version}, only version {HDR_VERSION} is supported")
    if code not in TOKEN_DTYPE_CODES:
        raise UserError(f"{path!r} has dtype code {code}, expected a token dtype code {TOKEN_DTYPE_CODES} "
                        f"(8 = uint16, 4 = int32)")
    dtype = np.dtype(DTYPES[code])
    expected = HDR_SIZE + chunk_size * dtype.itemsize
    if size != expected:
        raise UserError(f"{path!r} is {size} bytes, but its header says {chunk_size} {dtype.name} tokens "
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
        self.max_token_id = -1  # of every id added; -1 before any
        self._buffer = np.empty(chunk_size, dtype=self.dtype)
        self._filled = 0
        self._synced = 0  # tokens of the open chunk already in its `.open` file (see sync)

    @classmethod
    def resume(cls, outdir: Union[str, Path], prefix: str, chunk_size: int, vocab_size: int,
               dtype: Optional[np.dtype], shards: int, open_tokens: int, max_token_id: int) -> "PackedDatasetBuilder":
        """The builder of an interrupted run, continued from a position that `sync` returned: after `shards` complete
        files and the first `open_tokens` tokens of the next chunk. What was written after that position (later
        files, the rest of the open chunk, temporaries) is removed; the open chunk's tokens are read back from its
        file if it was completed, else from its `.open` file."""
        builder = cls(outdir, prefix, chunk_size, vocab_size, dtype)
        builder.filenames = [str(builder._path(counter)) for counter in range(shards)]
        missing = [name for name in builder.filenames if not os.path.isfile(name)]
        if missing:
            raise UserError(f"{missing[0]}, written before the interruption, is missing: the run cannot be continued; "
                            f"remove its shards and start again without --resume")
        if open_tokens:
            complete = builder._path(shards)
            source, offset = (complete, HDR_SIZE) if complete.is_file() else (builder._open_path(shards), 0)
            tokens = np.fromfile(source, dtype=builder.dtype, count=open_tokens, offset=offset) \
                if source.is_file() else np.empty(0, builder.dtype)
            if len(tokens) < open_tokens:
                raise UserError(f"{source} holds {len(tokens)} of the {open_tokens} tokens recorded before the "
                                f"interruption: the run cannot be continued; remove its shards and start again "
                                f"without --resume")
            builder._buffer[:open_tokens] = tokens
            builder._filled = open_tokens
        for stale in builder.outdir.glob(f"{prefix}_[0-9]*.bin"):
            if int(stale.stem.rsplit("_", 1)[1]) >= shards:
                stale.unlink()
        for stale in [*builder.outdir.glob(f".{prefix}_[0-9]*.open"), *builder.outdir.glob(f".{prefix}_*.tmp")]:
            stale.unlink()
        builder.n_tokens = shards * chunk_size + open_tokens
        builder.max_token_id = max_token_id
        return builder

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
        self.max_token_id = max(self.max_token_id, high)
        start = 0
        while start < arr.size:
            n = min(self.chunk_size - self._filled, arr.size - start)
            self._buffer[self._filled:self._filled + n] = arr[start:start + n]
            self._filled += n
            start += n
            if self._filled == self.chunk_size:
                self._write_chunk()
        self.n_tokens += arr.size

    def sync(self) -> Tuple[int, int]:
        """Make every token added so far durable, and return the position to continue from after a crash:
        (complete files, tokens of the open chunk). The open chunk's new tokens are appended to its hidden `.open`
        file and fsynced; that file goes once the chunk is written as a shard."""
        if self._filled > self._synced:
            with open(self._open_path(len(self.filenames)), "ab") as f:
                f.write(self._buffer[self._synced:self._filled].tobytes())
                f.flush()
                os.fsync(f.fileno())
            self._synced = self._filled
        return len(self.filenames), self._filled

    def finish(self) -> list:
        """Write the last, partial chunk with its real token count as chunk size (never padded); return all files."""
        if self._filled:
            self._write_chunk()
        return list(self.filenames)

    def _path(self, counter: int) -> Path:
        return self.outdir / f"{self.prefix}_{counter:010d}.bin"

    def _open_path(self, counter: int) -> Path:
        return self.outdir / f".{self.prefix}_{counter:010d}.open"

    def _write_chunk(self) -> None:
        counter = len(self.filenames)
        with atomic_write(self._path(counter)) as tmp, open(tmp, "wb") as f:
            f.write(_HEADER.pack(HDR_MAGIC, HDR_VERSION, self._code, self._filled))
            f.write(self._buffer[:self._filled])
        self._open_path(counter).unlink(missing_ok=True)  # the shard holds its tokens now
        self.filenames.append(str(self._path(counter)))
        self._filled = self._synced = 0


def manifest_name(run: str) -> str:
    """The manifest of one preparer run (e.g. `train_slimpajama`), so the runs into one directory keep one each."""
    return f"manifest_{run}.json"


def scan_shard(path: Union[str, Path]) -> Tuple[int, int]:
    """Check one file's header and size, then read its tokens (memory-mapped) once: (token count, max id or -1)."""
    dtype, chunk_size = read_header(str(path))
    if chunk_size == 0:
        return 0, -1
    tokens = np.memmap(path, dtype=dtype, mode="r", offset=HDR_SIZE, shape=(chunk_size,))
    return chunk_size, int(tokens.max())


def file_sha256(path: Union[str, Path]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Union[str, Path], shards: Optional[Sequence[Union[str, Path]]] = None, *,
                   name: str = SCANNED_MANIFEST, max_token_id: Optional[int] = None, vocab_size: Optional[int] = None,
                   tokenizer_sha256: Optional[str] = None, run: Optional[str] = None, num_nodes: int = 1,
                   node_rank: int = 0, inputs_sha256: Optional[str] = None) -> Path:
    """Write `directory/name`, the manifest that lets training read `shards` (files of `directory`; default: every
    *.bin in it). With max_token_id None (shards made elsewhere) every file is scanned for it; else only the headers
    are checked. A preparer run names itself (`run`, e.g. train_slimpajama) and, run on several nodes, which node
    wrote these shards and a digest of every node's inputs: training requires the manifests of every node of a run
    (packed_dataset.check_node_sets). Atomic: the manifest is complete or absent. Returns its path."""
    directory = Path(directory)
    paths = sorted(directory.glob("*.bin")) if shards is None else sorted(map(Path, shards))
    if not paths:
        raise FileNotFoundError(f"No .bin shards in {str(directory)!r} to write a manifest for")
    files, max_ids = {}, []
    for path in paths:
        if path.parent != directory:
            raise ValueError(f"{path} is not in {directory}: a manifest lists the files of its own directory")
        if max_token_id is None:
            tokens, high = scan_shard(path)
            max_ids.append(high)
        else:
            tokens = read_header(str(path))[1]
        files[path.name] = {"bytes": path.stat().st_size, "tokens": tokens}
    manifest = dict(format=f"LITPKDS v{HDR_VERSION}", vocab_size=vocab_size, tokenizer_sha256=tokenizer_sha256,
                    max_token_id=max(max_ids) if max_token_id is None else max_token_id,
                    tokens=sum(entry["tokens"] for entry in files.values()), files=files)
    if run is not None:
        manifest.update(run=run, num_nodes=num_nodes, node_rank=node_rank, inputs_sha256=inputs_sha256)
    write_json(directory / name, manifest)
    return directory / name


def read_manifests(directory: Union[str, Path]) -> List[dict]:
    """Every manifest of `directory`, each with its "path" added."""
    manifests = []
    for path in sorted(Path(directory).glob(MANIFEST_PATTERN)):
        try:
            manifest = json.loads(path.read_text())
            if not isinstance(manifest.get("files"), dict) or "max_token_id" not in manifest:
                raise ValueError("no 'files' object or no 'max_token_id'")
        except (ValueError, AttributeError) as error:
            raise UserError(f"{path} is not a valid shard manifest ({error}); rewrite it with "
                            f"{WRITE_MANIFEST_COMMAND} {Path(directory)}") from None
        manifests.append({**manifest, "path": str(path)})
    return manifests


def uncovered(files: Sequence[Union[str, Path]], manifests: List[dict]) -> Optional[Tuple[Path, str]]:
    """The first of `files` that no manifest lists with its current size, and why; None when every one is covered."""
    sizes: dict = {}  # file name -> {size: manifest}
    for manifest in manifests:
        for name, entry in manifest["files"].items():
            sizes.setdefault(name, {})[entry.get("bytes")] = manifest["path"]
    for path in map(Path, files):
        size = path.stat().st_size
        if path.name not in sizes:
            return path, f"is listed in no manifest ({MANIFEST_PATTERN}) of {path.parent}"
        if size not in sizes[path.name]:
            listed, manifest = next(iter(sizes[path.name].items()))
            return path, f"is {size} bytes, but {manifest} lists it with {listed} bytes"
    return None
