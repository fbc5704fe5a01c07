"""The checkpoint directory: one writer, one loader. Torch only (no Lightning), so generation, evaluation and chat
load weights without the training stack.

A checkpoint directory holds
- `lit_model.pth`: the full (unsharded) state dict of `model.GPT`, loaded with `weights_only=True`;
- `model_config.json`: the `Config`, read by `Config.from_file`;
- the tokenizer files (`tokenizer.model` or `tokenizer.json`, and their configs), when there is a tokenizer.

Pretraining's final weights, the Hugging Face converter and every later producer write it through `save_model_dir`;
every consumer reads it through `load_model` (or `load_state_dict` + `check_state_dict`).
"""

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from model import GPT, Config, build_rope_cache
from tokenizer import TOKENIZER_FILES
from utils import atomic_directory, atomic_write, write_json

WEIGHTS_FILE = "lit_model.pth"
CONFIG_FILE = "model_config.json"


def save_model_dir(model_or_state_dict: Union[torch.nn.Module, Mapping[str, torch.Tensor]], config: Config,
                   tokenizer_dir: Optional[Path], out_dir: Path,
                   json_files: Optional[Mapping[str, Any]] = None) -> None:
    """Write `out_dir` as a checkpoint directory: the weights, the config and the tokenizer files of `tokenizer_dir`
    (none: no tokenizer), and `json_files` ({file name: object}, e.g. provenance) as JSON. The weights are checked
    against `config` first.

    A new `out_dir` is built under a temporary name and renamed when complete, replacing an older one whole. When
    `out_dir` is `tokenizer_dir` itself (a converted Hugging Face directory, whose own files stay), the weights and
    then the config are each written atomically into it.
    """
    state_dict = (model_or_state_dict.state_dict() if isinstance(model_or_state_dict, torch.nn.Module)
                  else model_or_state_dict)
    with torch.device("meta"):
        check_state_dict(GPT(config), state_dict, f"the weights for {out_dir}")
    out_dir = Path(out_dir)
    json_files = json_files or {}
    if tokenizer_dir is not None and out_dir.resolve() == Path(tokenizer_dir).resolve():
        write_model_files(state_dict, config, json_files, out_dir)
        return
    with atomic_directory(out_dir) as tmp:
        write_model_files(state_dict, config, json_files, tmp)
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copy2(Path(tokenizer_dir) / name, tmp / name)


def write_model_files(state_dict: Mapping[str, torch.Tensor], config: Config, json_files: Mapping[str, Any],
                      directory: Path) -> None:
    save_atomic(dict(state_dict), directory / WEIGHTS_FILE)
    for name, obj in json_files.items():
        write_json(directory / name, obj)
    write_json(directory / CONFIG_FILE, asdict(config))  # last: a directory with a config has its weights


def save_atomic(obj: Any, path: Union[str, Path]) -> None:
    """torch.save through `atomic_write`."""
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


def check_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise an error naming the key (and both shapes) where `state_dict` does not fit `model`."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise KeyError(f"{source} does not match the model: missing keys {missing[:10]}, "
                       f"unexpected keys {unexpected[:10]}")
    for key, value in state_dict.items():
        if value.shape != expected[key].shape:
            raise ValueError(
                f"{source}: {key!r} has shape {tuple(value.shape)}, the model expects {tuple(expected[key].shape)}"
            )


def load_file(path: Union[str, Path]) -> Any:
    """What `path` holds, loaded with weights_only=True and memory-mapped (tensors are read when used); an empty or
    unreadable file is an error naming it, not torch's message about mmap or zip archives."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes): expected a file written by torch.save (was a copy or a download "
                         f"interrupted?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError) as error:  # a truncated zip archive; the first line of torch's message says why
        reason = str(error).split(". ")[0]
        raise ValueError(f"{path} cannot be read ({reason}): expected a complete file written by torch.save (was it "
                         f"truncated?)") from error


def load_state_dict(path: Union[str, Path]) -> dict:
    """The state dict of a `lit_model.pth` (or of a training checkpoint file's "model" entry), memory-mapped."""
    state_dict = load_file(path)
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path} holds a {type(state_dict).__name__}: expected a state dict (parameter names to "
                         f"tensors) as save_model_dir writes it")
    return state_dict.get("model", state_dict)


def load_checkpoint(model: torch.nn.Module, path: Union[str, Path]) -> None:
    state_dict = load_state_dict(path)
    check_state_dict(model, state_dict, str(path))
    model.load_state_dict(state_dict)


def load_model(checkpoint_dir: Union[str, Path], device: Union[str, torch.device] = "cpu",
               dtype: Optional[torch.dtype] = None) -> GPT:
    """Build the GPT of `checkpoint_dir/model_config.json` and load `checkpoint_dir/lit_model.pth` into it."""
    checkpoint_dir = Path(checkpoint_dir)
    config = Config.from_file(checkpoint_dir / CONFIG_FILE)
    with torch.device("meta"):
        model = GPT(config)
    state_dict = load_state_dict(checkpoint_dir / WEIGHTS_FILE)
    check_state_dict(model, state_dict, str(checkpoint_dir / WEIGHTS_FILE))
    model.load_state_dict(state_dict, assign=True)
    # the rope caches are not in the checkpoint: compute them on the CPU, then move the model
    model.cos, model.sin = build_rope_cache(config)
    return model.to(device=device, dtype=dtype).eval()
