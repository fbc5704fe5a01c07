"""The commands that README.md and docs/*.md show, and the one way a test runs one: `documented(command, ...)` checks
that a page shows `command` and returns its argv with only the substitutions of docs/development.md's table, and
`run_script(argv)` runs it in-process through the script's own command line. tests/test_docs.py fails when a page
shows a command that no test passes to `documented`."""

import io
import os
import re
import runpy
import shlex
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Commands the docs show that no test runs, and why (docs/development.md says the same)
NOT_RUN = {
    "pip install": "the set-up lines: .ci/run runs them from a fresh clone on every change",
    "python -m pytest": "the suite itself",
    "python scripts/lock_requirements.py": "needs the package registry; tests/test_requirements.py checks the locks",
}

# The substitutions of docs/development.md's table: flags whose documented value a test may replace, beside those
# whose documented value is a path
COUNT_FLAGS = {"--max_steps", "--max_new_tokens", "--eval_iters", "--num_sequences", "--seq_len", "--batch_size",
               "--vocab_size", "--max_seq_length", "--n_layers"}
MODEL_FLAGS = {"--model_name", "--preset", "--tasks"}
# flags a test may add where a command relies on a recipe's default that needs the real data or a GPU
ADDABLE_FLAGS = {"--model_name", "--train_data_dir", "--val_data_dir", "--tokenizer_dir", "--out_dir", "--accelerator",
                 "--devices", "--precision", "--global_batch_size", "--micro_batch_size", "--max_steps",
                 "--eval_iters", "--eval_interval", "--save_interval", "--include_path", "--device", "--max_files",
                 "--num_processes", "--seq_len", "--data_dir", "--initial_checkpoint_dir",
                 "--vocab_size", "--checkpoint_dir", "--max_new_tokens"}

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
_INLINE = re.compile(r"`(python [^`]+)`")


def normalize(command: str) -> str:
    """One spelling of a command: its words, quoted only where the shell needs it."""
    return shlex.join(shlex.split(command))


def documented_commands() -> Dict[str, str]:
    """Every command of the pages (normalized) -> the page that shows it first. A command is a line of a `bash` block
    (continuation lines joined, comments dropped, `&&` chains split) or an inline `python ...` in backticks."""
    commands: Dict[str, str] = {}
    for page in PAGES:
        text = page.read_text()
        found = []
        for language, block in _FENCE.findall(text):
            if language == "bash":
                for line in block.replace("\\\n", " ").splitlines():
                    line = line.split(" # ")[0].strip()  # a trailing comment
                    if line and not line.startswith("#"):
                        found += [part.strip() for part in line.split("&&")]
        # an inline `python SCRIPT ...` naming a script of the repository (not prose such as `python DIR/script.py`)
        found += [command for command in _INLINE.findall(_FENCE.sub("", text))
                  if (ROOT / command.split()[1]).is_file()]
        for command in found:
            commands.setdefault(normalize(command), os.path.relpath(page, ROOT))
    return commands


def not_run_reason(command: str) -> Optional[str]:
    return next((reason for prefix, reason in NOT_RUN.items() if command.startswith(prefix)), None)


def python_blocks() -> List[str]:
    """The ```python blocks of the pages."""
    return [block for page in PAGES for language, block in _FENCE.findall(page.read_text()) if language == "python"]


def documented(command: str, replace: Optional[Mapping[str, str]] = None,
               add: Optional[Mapping[str, str]] = None) -> List[str]:
    """argv (script first) of `command`, which a page must show, with the flag values of `replace` substituted and
    the flags of `add` appended, each allowed by docs/development.md's table."""
    shown = documented_commands()
    assert normalize(command) in shown, f"no page of the docs shows {command!r}"
    python, script, *words = shlex.split(command)
    assert python == "python", command
    flags = _flag_values(words, command)
    for flag, value in (replace or {}).items():
        assert flag in flags, f"{command!r} shows no {flag} to replace"
        allowed = flag in COUNT_FLAGS | MODEL_FLAGS or _looks_like_path(flags[flag])
        assert allowed, f"{flag} {flags[flag]} is not a path, a count or a model: docs/development.md allows no change"
        flags[flag] = str(value)
    for flag, value in (add or {}).items():
        assert flag not in flags, f"{command!r} shows {flag} already: replace it instead"
        assert flag in ADDABLE_FLAGS, f"{flag}: docs/development.md's table allows no test to add it"
        flags[flag] = str(value)
    return [script] + [word for flag, value in flags.items() for word in ([flag] if value is None else [flag, value])]


def _flag_values(words: Sequence[str], command: str) -> Dict[str, Optional[str]]:
    """--flag value pairs (None for a bare switch such as --adaptive), in order."""
    flags: Dict[str, Optional[str]] = {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            following = words[i + 1] if i + 1 < len(words) else "--"
            flags[word] = None if following.startswith("--") else following
        else:
            assert i > 0 and words[i - 1].startswith("--"), f"{command!r}: {word!r} follows no flag"
    return flags


def _looks_like_path(value: Optional[str]) -> bool:
    return value is not None and ("/" in value or re.search(r"\.[A-Za-z]\w*$", value) is not None)


def run_script(argv: Sequence[str], stdin: str = "") -> None:
    """Run the script argv[0] (relative to the repository root) with the flags argv[1:] in this process, as
    `python argv...` would: through its `if __name__ == "__main__"` block, its `cli(...)` and sys.argv. A non-zero
    exit fails the test."""
    saved = sys.argv, sys.stdin
    sys.argv, sys.stdin = [str(ROOT / argv[0]), *argv[1:]], io.StringIO(stdin)
    try:
        runpy.run_path(str(ROOT / argv[0]), run_name="__main__")
    except SystemExit as exit:
        assert exit.code in (0, None), f"{' '.join(argv)} exited with {exit.code}"
    finally:
        sys.argv, sys.stdin = saved
