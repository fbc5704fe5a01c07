"""Helpers every script shares: durable (atomic) writes and the typed-signature CLI. Imports nothing of the repository
and not torch, so data preparation stays light."""

import argparse
import collections.abc
import inspect
import json
import os
import re
import shutil
import tempfile
import typing
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Literal, Mapping, Optional, Union


# Set to 1 to see the traceback of a user error too (by default the CLI prints its one-line message)
TRACEBACK_VARIABLE = "SMALL_LLAMA_TRACEBACK"


class UserError(ValueError):
    """Bad input from the user (an argument, a file, data): `cli` prints its message as one line and exits with 2.
    Every other exception keeps its traceback, so that real bugs stay visible."""


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


@contextmanager
def atomic_directory(path: Union[str, Path]) -> Iterator[Path]:
    """Yield an empty temporary directory beside `path`; once the block has filled it, rename it to `path`. A crash
    never leaves a partial directory under the final name; on an error the temporary directory is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    remove_path(tmp)  # left by a crash
    tmp.mkdir(parents=True)
    try:
        yield tmp
        move_into_place(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise


def move_into_place(tmp: Path, path: Path) -> None:
    """Rename the complete `tmp` (a file or a directory) to `path`. A `path` already there is kept, renamed, until the
    new one is in place."""
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        remove_path(old)
        os.replace(path, old)
    os.replace(tmp, path)
    remove_path(old)


def remove_path(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def write_json(path: Union[str, Path], obj: Any) -> None:
    """`obj` as indented JSON, through `atomic_write`."""
    with atomic_write(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2) + "\n")


def read_json(path: Union[str, Path], expected: str) -> Any:
    """The JSON value of a file the user gave (or a script wrote into a directory the user gave); one that does not
    parse is a `UserError` naming it and `expected`, what it should hold ("the checkpoint's generation settings")."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error}): expected {expected}") from None


def cli(fn: Callable, argv: Optional[list] = None, *, defaults: Optional[Mapping[str, Any]] = None,
        description: Optional[str] = None) -> Any:
    """Call `fn` with arguments parsed from the command line (`argv`, default sys.argv): its typed signature is the CLI.

    `--name value` for each parameter (a bool is a flag: `--name` / `--no-name`), `None` spelled `none`;
    Optional[X], Literal[...] and lists (`--name a b` or `--name a,b`) are understood. A parameter without a default
    is a required flag.

    --help shows the docstring's text before its `Args:` line, then each flag with its default and the help of its
    `    name: help` entry in `Args:`; lines more indented than an entry's first line continue its help.

    A recipe is `fn` with other defaults: `cli(setup, defaults=RECIPE, description=__doc__)`. `defaults` (parameter
    name -> value) replace the defaults of `fn`'s parameters, in --help and where a flag is not given; a name that
    is not a parameter of `fn` raises TypeError. `description` replaces the docstring's text before `Args:` (the
    per-flag help still comes from `fn`'s docstring).

    A `UserError` raised by `fn` (bad input: an argument, a file, data) is printed as one line, `PROG: error: ...`,
    and exits with 2, as argparse's own errors; so is a `FileNotFoundError` (in a script, a path the user gave that
    does not exist: a checkpoint directory, a data file). SMALL_LLAMA_TRACEBACK=1 shows their traceback. Other
    exceptions keep theirs.
    """
    parameters = inspect.signature(fn).parameters
    defaults = dict(defaults or {})
    unknown = sorted(set(defaults) - set(parameters))
    if unknown:
        raise TypeError(f"{fn.__name__}() has no parameters {unknown}; its parameters: {', '.join(parameters)}")
    own_description, *args_section = _ARGS_HEADING.split(inspect.getdoc(fn) or "", maxsplit=1)
    arg_help = _arg_help("".join(args_section))
    parser = argparse.ArgumentParser(
        description=own_description.strip() if description is None else inspect.cleandoc(description),
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keeps the docstring's commands and paragraphs
    )
    hints = typing.get_type_hints(fn)
    for name, param in parameters.items():
        kind = hints.get(name, str)
        default = defaults.get(name, param.default)
        kwargs = dict(help=arg_help.get(name, ""))
        if default is inspect.Parameter.empty:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
            kwargs["help"] += f" (default: {default})"
        kwargs["help"] = kwargs["help"].replace("%", "%%")  # argparse %-formats help: a literal % would fail
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
    arguments = vars(parser.parse_args(argv))
    try:
        return fn(**arguments)
    except (UserError, FileNotFoundError) as error:
        if os.environ.get(TRACEBACK_VARIABLE, "0") not in ("", "0"):
            raise
        # every process of a launched run may meet it: another rank than 0 names itself, so that an error only it
        # met is not lost
        rank = "" if launched_as_rank_zero() else f" ({launched_rank()})"
        parser.exit(2, f"{parser.prog}: error{rank}: {error}\n")


_ARGS_HEADING = re.compile(r"^[ \t]*Args:[ \t]*$", re.M)


def _arg_help(args_section: str) -> Dict[str, str]:
    """`name -> help` for the `name: help` entries of a docstring's `Args:` section; the lines more indented than an
    entry's first line continue it. A blank line ends an entry, a line less indented than the entries the section."""
    helps: Dict[str, str] = {}
    name, indent = None, 0
    for line in args_section.splitlines():
        depth = len(line) - len(line.lstrip())
        if not line.strip():
            name = None
        elif depth < indent:
            break
        elif name is not None and depth > indent:
            helps[name] += " " + line.strip()
        else:
            entry = re.fullmatch(r"\s*(\w+): (.+)", line)
            name = entry[1] if entry else None  # prose at the entries' depth: continue nothing
            if entry:
                indent = depth
                helps[name] = entry[2].strip()
    return helps


RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")  # set by Fabric's launcher, torchrun, SLURM


def launched_as_rank_zero() -> bool:
    """Whether the launcher (Fabric's, torchrun, SLURM) made this process rank 0: the rank variables it sets are all
    unset or 0 there."""
    return all(os.environ.get(name, "0") == "0" for name in RANK_VARIABLES)


def launched_rank() -> str:
    """Which process the launcher made this one, by its rank variables that are not 0: "LOCAL_RANK 1, NODE_RANK 0"."""
    return ", ".join(f"{name} {os.environ[name]}" for name in RANK_VARIABLES if os.environ.get(name, "0") != "0")


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
