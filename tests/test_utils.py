"""utils.py: the typed-signature CLI and its one-line user errors."""

from pathlib import Path
from typing import List, Literal, Optional

import pytest

from utils import TRACEBACK_VARIABLE, UserError, cli


def test_cli_parses_the_typed_signature():
    def main(path: Path, k: Optional[int] = 3, flag: bool = False, mode: Literal["a", "b"] = "a",
             names: List[str] = ["x"], rate: float = 0.5):
        return path, k, flag, mode, names, rate

    assert cli(main, ["--path", "p"]) == (Path("p"), 3, False, "a", ["x"], 0.5)
    assert cli(main, ["--path", "p", "--k", "none", "--flag", "--mode", "b", "--names", "u", "v", "--rate", "2"]) == (
        Path("p"), None, True, "b", ["u", "v"], 2.0)
    assert cli(main, ["--path", "p", "--no-flag"])[2] is False
    assert cli(main, ["--path", "p", "--names", "a,b", "c"])[4] == ["a", "b", "c"]
    assert cli(main, ["--path", "p", "--names", ""])[4] == []
    with pytest.raises(SystemExit):
        cli(main, ["--path", "p", "--mode", "c"])
    with pytest.raises(SystemExit):
        cli(main, [])  # --path is required


def test_cli_converts_list_items_after_splitting():
    def main(sizes: List[int] = [1]):
        return sizes

    assert cli(main, ["--sizes", "1,2", "3"]) == [1, 2, 3]
    with pytest.raises(SystemExit):
        cli(main, ["--sizes", "1,x"])


def recipe_target(path: Path, steps: int = 10, rate: float = 0.5):
    """Train something.

    Args:
        path: where the output goes; a help long enough
            to wrap onto a second line
              and a third, indented further
        steps: optimizer steps
        rate: learning rate

    Returns:
        rate: not a flag's help, the Returns section
    """
    return path, steps, rate


def help_text(capsys, fn, **kwargs) -> str:
    with pytest.raises(SystemExit):
        cli(fn, ["--help"], **kwargs)
    return " ".join(capsys.readouterr().out.split())  # unwrapped


def test_cli_joins_continuation_lines_of_an_args_entry(capsys):
    text = help_text(capsys, recipe_target)
    assert "--path PATH where the output goes; a help long enough to wrap onto a second line and a third" in text
    assert "--rate RATE learning rate (default: 0.5)" in text


def test_cli_defaults_replace_the_signature_defaults_in_help_and_call(capsys):
    defaults = dict(path=Path("out/recipe"), steps=3)
    assert cli(recipe_target, [], defaults=defaults) == (Path("out/recipe"), 3, 0.5)  # --path no longer required
    assert cli(recipe_target, ["--steps", "4"], defaults=defaults) == (Path("out/recipe"), 4, 0.5)
    text = help_text(capsys, recipe_target, defaults=defaults)
    assert "--path PATH where the output goes" in text and "(default: out/recipe)" in text
    assert "--steps STEPS optimizer steps (default: 3)" in text


def test_cli_refuses_defaults_for_names_that_are_not_parameters():
    with pytest.raises(TypeError, match=r"recipe_target\(\) has no parameters \['step', 'zeta'\]; "
                                        r"its parameters: path, steps, rate"):
        cli(recipe_target, [], defaults=dict(step=3, zeta=1, rate=0.1))


def test_cli_description_replaces_the_docstring_text_before_args(capsys):
    description = """Pretrain the recipe: its data commands, kept as written.

        python prepare.py --source a \\
            --destination b
    """
    with pytest.raises(SystemExit):
        cli(recipe_target, ["--help"], description=description)
    out = capsys.readouterr().out
    assert "Pretrain the recipe" in out and "Train something" not in out
    assert "python prepare.py --source a \\\n    --destination b\n" in out  # not reflowed
    assert "optimizer steps" in out  # the flags' help is still the function's


REPOSITORY_MODULES = {"utils", "model", "tokenizer", "checkpoint", "hf", "training", "packed_dataset", "shard_format",
                      "generation", "speculative", "chat_template", "sft_data", "sft_batches", "lora", "training_state"}


def test_a_user_error_is_one_line_and_other_errors_keep_their_traceback(capsys, monkeypatch):
    def main(steps: int = 1, checkpoint_dir: str = ""):
        if steps < 1:
            raise UserError(f"--steps must be at least 1, got {steps}")
        if checkpoint_dir:
            raise FileNotFoundError(f"Model config {checkpoint_dir!r}/model_config.json does not exist")
        raise RuntimeError("a bug")

    with pytest.raises(SystemExit) as exit_info:
        cli(main, ["--steps", "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith("error: --steps must be at least 1, got 0")
    with pytest.raises(SystemExit) as exit_info:  # a path the user gave that does not exist
        cli(main, ["--checkpoint_dir", "missing"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith("error: Model config 'missing'/model_config.json does not exist")
    with pytest.raises(RuntimeError, match="a bug"):  # not a user error: the traceback stays
        cli(main, [])
    monkeypatch.setenv("LOCAL_RANK", "1")  # another process of a launched run says it too, naming itself
    with pytest.raises(SystemExit):
        cli(main, ["--steps", "0"])
    assert capsys.readouterr().err.endswith(": error (LOCAL_RANK 1): --steps must be at least 1, got 0\n")
    monkeypatch.setenv(TRACEBACK_VARIABLE, "1")
    with pytest.raises(UserError):
        cli(main, ["--steps", "0"])
