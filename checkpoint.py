"""The checkpoint directory: one writer, one loader. Torch only (no Lightning), so generation, evaluation and chat
load weights without the training stack.

A checkpoint directory holds
- `lit_model.pth`: the full (unsharded) state dict of `model.GPT`, loaded with `weights_only=True`;
- `model_config.json`: the `Config`, read by `load_config`;
- the tokenizer files (`tokenizer.model` or `tokenizer.json`, and their configs), when there is a tokenizer;
- what a producer adds: a chat template (`chat_template.jinja`), a finetuning's LoRA adapters and their config.

Pretraining's final weights, the Hugging Face converter and every later producer write it through `save_model_dir`;
every consumer reads it through `load_model` (or `load_state_dict` + `check_state_dict`).

Training checkpoints sharded by FSDP (a directory of `.distcp` files and a `.metadata` index, as
torch.distributed.checkpoint writes them) are read through `load_shards`, which unpickles nothing but the index's own
classes and loads every non-tensor item with `weights_only=True`: like every other load here, a checkpoint from an
untrusted source cannot run code.
"""

import io
import os
import pickle
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from model import GPT, Config, build_rope_cache
from quantize import QUANTIZATION_FILE, Quantization, prepare_model, quantize_model, read_quantization
from tokenizer import TOKENIZER_FILES
from utils import UserError, atomic_directory, atomic_write, write_json

# what the `.metadata` index of torch.distributed.checkpoint pickles (as torch 2.13 writes it): its dataclasses,
# torch.Size, dtypes and layouts, and the checkpoint's path; anything else in it is refused
SHARD_INDEX_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "TensorProperties",
                                              "ChunkStorageMetadata", "BytesStorageMetadata", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath"},
}

WEIGHTS_FILE = "lit_model.pth"
CONFIG_FILE = "model_config.json"


def save_model_dir(model_or_state_dict: Union[torch.nn.Module, Mapping[str, torch.Tensor]], config: Config,
                   tokenizer_dir: Optional[Path], out_dir: Path,
                   json_files: Optional[Mapping[str, Any]] = None, text_files: Optional[Mapping[str, str]] = None,
                   tensor_files: Optional[Mapping[str, Mapping[str, torch.Tensor]]] = None) -> None:
    """Write `out_dir` as a checkpoint directory: the weights, the config and the tokenizer files of `tokenizer_dir`
    (none: no tokenizer), and {file name: content} of `json_files` (objects, e.g. provenance) as JSON,
    `text_files` (e.g. chat_template.jinja) as UTF-8 text and `tensor_files` (state dicts) by torch.save; these
    replace a tokenizer file of the same name. The weights are checked against `config` first.

    A new `out_dir` is built under a temporary name and renamed when complete, replacing an older one whole. When
    `out_dir` is `tokenizer_dir` itself (a converted Hugging Face directory, whose own files stay), the weights and
    then the config are each written atomically into it.
    """
    state_dict = (model_or_state_dict.state_dict() if isinstance(model_or_state_dict, torch.nn.Module)
                  else model_or_state_dict)
    json_files = json_files or {}
    with torch.device("meta"):
        structure = GPT(config)
        if QUANTIZATION_FILE in json_files:  # a quantized checkpoint: codes and scales in place of weights
            quantize_model(structure, Quantization(**{**json_files[QUANTIZATION_FILE],
                                                        "excluded": tuple(json_files[QUANTIZATION_FILE]["excluded"])}))
        check_state_dict(structure, state_dict, f"the weights for {out_dir}")
    if config.tie_embeddings:  # one tensor under both keys, stored once (an FSDP gather gives two equal copies)
        if not torch.equal(state_dict["lm_head.weight"], state_dict["transformer.wte.weight"]):
            raise ValueError(f"the weights for {out_dir}: tie_embeddings, but lm_head.weight is not the embedding")
        state_dict = {**state_dict, "lm_head.weight": state_dict["transformer.wte.weight"]}
    out_dir = Path(out_dir)
    if tokenizer_dir is not None and out_dir.resolve() == Path(tokenizer_dir).resolve():
        write_extra_files(text_files or {}, tensor_files or {}, out_dir)
        write_model_files(state_dict, config, json_files, out_dir)
        return
    with atomic_directory(out_dir) as tmp:
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
        write_extra_files(text_files or {}, tensor_files or {}, tmp)
        write_model_files(state_dict, config, json_files, tmp)


def write_extra_files(text_files: Mapping[str, str], tensor_files: Mapping[str, Mapping[str, torch.Tensor]],
                      directory: Path) -> None:
    for name, text in text_files.items():
        with atomic_write(directory / name) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")
    for name, tensors in tensor_files.items():
        save_atomic(dict(tensors), directory / name)


def write_model_files(state_dict: Mapping[str, torch.Tensor], config: Config, json_files: Mapping[str, Any],
                      directory: Path) -> None:
    save_atomic(dict(state_dict), directory / WEIGHTS_FILE)
    for name, obj in json_files.items():
        write_json(directory / name, obj)
    write_json(directory / CONFIG_FILE, asdict(config))  # last: a directory with a config has its weights


def save_atomic(obj: Any, path: Union[str, Path]) -> None:
    """torch.save straight into a temporary file beside `path` (through `atomic_write`: fsynced, then renamed), then
    the directory fsynced, so that the rename survives a power cut. Nothing is staged in memory or in $TMPDIR: torch
    writes tensor by tensor into the file."""
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)
    directory = os.open(Path(path).parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def check_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise an error naming the key (and both shapes) where `state_dict` does not fit `model`."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise UserError(f"{source} does not match the model: missing keys {missing[:10]}, "
                        f"unexpected keys {unexpected[:10]}")
    for key, value in state_dict.items():
        if value.shape != expected[key].shape:
            raise UserError(
                f"{source}: {key!r} has shape {tuple(value.shape)}, the model expects {tuple(expected[key].shape)}"
            )


def load_file(path: Union[str, Path]) -> Any:
    """What `path` holds, loaded with weights_only=True and memory-mapped (tensors are read when used); an empty or
    unreadable file is an error naming it, not torch's message about mmap or zip archives."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty (0 bytes): expected a file written by torch.save (was a copy or a download "
                        f"interrupted?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError) as error:  # a truncated zip archive; the first line of torch's message says why
        reason = str(error).split(". ")[0]
        raise UserError(f"{path} cannot be read ({reason}): expected a complete file written by torch.save (was it "
                        f"truncated?)") from error


def load_state_dict(path: Union[str, Path]) -> dict:
    """The state dict of a `lit_model.pth` (or of a training checkpoint file's "model" entry), memory-mapped."""
    state_dict = load_file(path)
    if not isinstance(state_dict, dict):
        raise UserError(f"{path} holds a {type(state_dict).__name__}: expected a state dict (parameter names to "
                        f"tensors) as save_model_dir writes it")
    return state_dict.get("model", state_dict)


def load_checkpoint(model: torch.nn.Module, path: Union[str, Path]) -> None:
    state_dict = load_state_dict(path)
    check_state_dict(model, state_dict, str(path))
    model.load_state_dict(state_dict)


def load_model(checkpoint_dir: Union[str, Path], device: Union[str, torch.device] = "cpu",
               dtype: Optional[torch.dtype] = None) -> GPT:
    """Build the GPT of `checkpoint_dir/model_config.json` and load `checkpoint_dir/lit_model.pth` into it. A
    quantized checkpoint (quantization.json) gets its QuantizedLinear layers, packed for `device` with activations in
    `dtype` (see quantize.py)."""
    checkpoint_dir = Path(checkpoint_dir)
    config = load_config(checkpoint_dir)
    quantization = quantization_of(checkpoint_dir)
    with torch.device("meta"):
        model = GPT(config)
        if quantization is not None:
            quantize_model(model, quantization)
    state_dict = load_state_dict(checkpoint_dir / WEIGHTS_FILE)
    check_state_dict(model, state_dict, str(checkpoint_dir / WEIGHTS_FILE))
    model.load_state_dict(state_dict, assign=True)
    model.tie_weights()
    # the rope caches are not in the checkpoint: compute them on the CPU, then move the model
    model.cos, model.sin = build_rope_cache(config)
    model = model.to(device=device, dtype=dtype).eval()
    if quantization is not None:
        prepare_model(model, dtype or torch.float32)
    return model


def quantization_of(checkpoint_dir: Union[str, Path]) -> Optional[Quantization]:
    """The quantization of a checkpoint directory (None: float weights); a quantization.json that does not parse or
    is of another format is a UserError naming it."""
    try:
        return read_quantization(Path(checkpoint_dir))
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{Path(checkpoint_dir) / QUANTIZATION_FILE}: {error}: expected what scripts/quantize.py "
                        f"writes") from None


def refuse_quantized(checkpoint_dir: Union[str, Path], flag: str, use: str) -> None:
    """A UserError where a quantized checkpoint cannot be used (`use`: "training", "an export"...)."""
    quantization = quantization_of(checkpoint_dir)
    if quantization is not None:
        raise UserError(f"{flag} {checkpoint_dir} is quantized ({quantization.mode}): {use} needs its float weights; "
                        f"use the checkpoint it was quantized from")


def load_config(path: Union[str, Path]) -> Config:
    """The Config of a checkpoint directory or of its model_config.json: `Config.from_file`, with a file that does
    not parse or describes no model as a UserError naming it (model.py, torch only, raises plain ValueError)."""
    path = Path(path)
    file = path / CONFIG_FILE if path.is_dir() else path
    try:
        return Config.from_file(file)
    except ValueError as error:
        message = str(error)
        raise UserError(message if message.startswith(str(file)) else f"{file}: {message}") from None


def named_config(name: str, flag: str = "--model_name") -> Config:
    """`Config.from_name` of a name the user gave with `flag`; an unknown name is a UserError naming the flag."""
    if name not in Config.names():
        raise UserError(f"{flag} {name!r} is not a config of model.py; the known ones: {', '.join(Config.names())}")
    return Config.from_name(name)


class UnsafeCheckpointError(UserError):
    """A sharded checkpoint holds something other than its index and tensors (pickled objects that could run code)."""


class _ShardIndexUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if name in SHARD_INDEX_CLASSES.get(module, ()) or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self.path} pickles {module}.{name}: expected only the index classes of torch.distributed.checkpoint "
            f"(refused, since unpickling it could run code; was the checkpoint tampered with?)")


def read_shard_index(directory: Path):
    """The `.metadata` index of a sharded checkpoint directory, unpickled with only its own classes allowed; an
    index naming a file outside `directory` is refused too."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(directory) / ".metadata"
    try:
        with open(path, "rb") as f:
            index = _ShardIndexUnpickler(f, path).load()
    except UnsafeCheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as error:
        raise UserError(f"{path} cannot be read ({error}): expected the index torch.distributed.checkpoint "
                        f"writes (was it truncated?)") from error
    if not isinstance(index, Metadata):
        raise UserError(f"{path} holds a {type(index).__name__}: expected the index (Metadata) that "
                        f"torch.distributed.checkpoint writes")
    outside = [info.relative_path for info in (index.storage_data or {}).values()
               if Path(info.relative_path).name != info.relative_path]
    if outside:
        raise UnsafeCheckpointError(f"{path} points at {outside[0]!r}, outside {directory}: expected only the shard "
                                    f"files of the directory")
    return index


def load_shards(directory: Path, state_dict: dict) -> None:
    """torch.distributed.checkpoint.load of `directory` into `state_dict` (in place, resharded to this process
    group), with the index read by `read_shard_index` and every non-tensor item loaded with weights_only=True.
    Called by every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    directory = Path(directory)
    index = read_shard_index(directory)  # here, not inside dcp.load, which would hide the error behind its own

    class Reader(dcp.FileSystemReader):
        def read_metadata(self):  # no `rank` keyword: dcp then looks for no rank-local index files either
            index.storage_meta = index.storage_meta or dcp.metadata.StorageMeta()
            index.storage_meta.load_id = self.load_id
            return index

    class Planner(dcp.DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as error:
                file = directory / index.storage_data[read_item.storage_index].relative_path
                reason = str(error).split("\n")[0]
                raise UnsafeCheckpointError(
                    f"{file}: item {read_item.dest_index.fqn!r} is not loadable with weights_only=True ({reason}): "
                    f"expected plain numbers, strings and tensors (refused, since it could run code)") from None
            if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes, which loads with weights_only=False
                dcp._nested_dict.set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    try:
        dcp.load(state_dict, storage_reader=Reader(directory), planner=Planner())
    except CheckpointException as error:  # with a process group, dcp wraps every rank's error: show ours
        ours = [exc for exc, _ in error.failures.values() if isinstance(exc, UnsafeCheckpointError)]
        if ours:
            raise ours[0] from None
        raise
