"""Small helpers shared by the scripts: checkpoint save/load with clear errors, parameter counts, the CLI."""

import argparse
import collections.abc
import inspect
import os
import re
import tempfile
import typing
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Optional, Union

import torch

from model import GPT, Config, build_rope_cache


@contextmanager
def atomic_write(path: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; once the block has written it, flush it to disk and rename it to
    `path`. A crash never leaves a partial file under the final name; on an error the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private (0600); give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
        raise KeyError(f"{source} does not match the model: missing keys {missing[:10]}, unexpected keys {unexpected[:10]}")
    for key, value in state_dict.items():
        if value.shape != expected[key].shape:
            raise ValueError(
                f"{source}: {key!r} has shape {tuple(value.shape)}, the model expects {tuple(expected[key].shape)}"
            )


def load_state_dict(path: Union[str, Path]) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {str(path)!r} does not exist")
    state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return state_dict.get("model", state_dict)


def load_checkpoint(model: torch.nn.Module, path: Union[str, Path]) -> None:
    state_dict = load_state_dict(path)
    check_state_dict(model, state_dict, str(path))
    model.load_state_dict(state_dict)


def load_model(checkpoint_dir: Union[str, Path], device: Union[str, torch.device] = "cpu",
               dtype: Optional[torch.dtype] = None) -> GPT:
    """Build the GPT of `checkpoint_dir/model_config.json` and load `checkpoint_dir/lit_model.pth` into it."""
    checkpoint_dir = Path(checkpoint_dir)
    config = Config.from_file(checkpoint_dir / "model_config.json")
    with torch.device("meta"):
        model = GPT(config)
    state_dict = load_state_dict(checkpoint_dir / "lit_model.pth")
    check_state_dict(model, state_dict, str(checkpoint_dir / "lit_model.pth"))
    model.load_state_dict(state_dict, assign=True)
    # the rope caches are not in the checkpoint: compute them on the CPU, then move the model
    model.cos, model.sin = build_rope_cache(config)
    return model.to(device=device, dtype=dtype).eval()


def num_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def cli(fn: Callable, argv: Optional[list] = None) -> Any:
    """Call `fn` with arguments parsed from the command line: its typed signature is the CLI.

    `--name value` for each parameter (a bool is a flag: `--name` / `--no-name`), `None` spelled `none`;
    Optional[X], Literal[...] and lists (`--name a b` or `--name a,b`) are understood. Help comes from the docstring's `Args:` section.
    """
    doc = inspect.getdoc(fn) or ""
    arg_help = dict(re.findall(r"^\s{4}(\w+): (.+)$", doc.split("Args:", 1)[1], re.M)) if "Args:" in doc else {}
    parser = argparse.ArgumentParser(description=doc.split("Args:", 1)[0].strip())
    hints = typing.get_type_hints(fn)
    for name, param in inspect.signature(fn).parameters.items():
        kind = hints.get(name, str)
        kwargs = dict(help=arg_help.get(name, ""))
        if param.default is inspect.Parameter.empty:
            kwargs["required"] = True
        else:
            kwargs["default"] = param.default
            kwargs["help"] += f" (default: {param.default})"
        optional = typing.get_origin(kind) is Union and type(None) in typing.get_args(kind)
        if optional:
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is Literal:
            kwargs["choices"] = list(typing.get_args(kind)) + ([None] if optional else [])
            kwargs["type"] = _none_or(type(typing.get_args(kind)[0]), optional)
        elif typing.get_origin(kind) in (list, tuple, collections.abc.Sequence):
            kwargs["nargs"] = "*"
            kwargs["action"] = _CommaSeparated
            kwargs["const"] = typing.get_args(kind)[0]  # the item type, applied after splitting at commas
        else:
            kwargs["type"] = _none_or(kind, optional)
        parser.add_argument(f"--{name}", **kwargs)
    return fn(**vars(parser.parse_args(argv)))


class _CommaSeparated(argparse.Action):
    """`--names a b`, `--names a,b` and `--names ""` (none) all work for a list parameter."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            items = [self.const(item) for value in values for item in value.split(",") if item]
        except ValueError as error:
            raise argparse.ArgumentError(self, f"invalid value: {error}") from None
        setattr(namespace, self.dest, items)


def _none_or(kind: Callable, optional: bool) -> Callable:
    if not optional:
        return kind

    def parse(text: str) -> Any:
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = getattr(kind, "__name__", "value")
    return parse
