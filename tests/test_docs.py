"""README.md and docs/: every command a page shows is run by a test (tests/documented.py), the README stays a page
that links every docs page, links resolve, and the Python a page shows runs."""

import ast
import re
from pathlib import Path

import torch

from tests.documented import (ADDABLE_FLAGS, COUNT_FLAGS, MODEL_FLAGS, PAGES, ROOT, documented_commands, normalize,
                              not_run_reason, python_blocks)


def commands_named_by_tests() -> dict:
    """normalized command -> the test file of each `documented("...")` call with a literal command."""
    named = {}
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "documented" and node.args
                    and isinstance(node.args[0], ast.Constant)):
                named.setdefault(normalize(node.args[0].value), path.name)
    return named


def test_every_documented_command_is_run_by_a_test_and_every_test_command_is_documented():
    shown, named = documented_commands(), commands_named_by_tests()
    untested = {command: page for command, page in shown.items()
                if command not in named and not not_run_reason(command)}
    assert not untested, f"commands the docs show that no test passes to documented(...): {untested}"
    unshown = {command: test for command, test in named.items() if command not in shown}
    assert not unshown, f"commands tests run that no page shows: {unshown}"
    assert len(named) >= 30  # the parser found the tests' commands


def test_the_substitution_table_of_the_docs_names_every_flag_a_test_may_change():
    text = (ROOT / "docs/development.md").read_text()
    table = text[text.index("## Documented commands"):]
    for flag in sorted(COUNT_FLAGS | MODEL_FLAGS | ADDABLE_FLAGS):
        assert f"`{flag}`" in table, flag
    for prefix in ("pip install", "python -m pytest", "python scripts/lock_requirements.py"):
        assert f"`{prefix}" in table, prefix  # the commands no test runs are named, with why


def test_readme_is_a_page_that_links_every_docs_page_and_every_link_resolves():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)", readme))
    assert linked == {page.name for page in (ROOT / "docs").glob("*.md")}
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#]+\.md)(?:#[\w-]+)?\)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).is_file(), f"{page.name} links {target}, which does not exist"


def test_the_python_a_page_shows_runs():
    """docs/model.md's snippet, with the 1.1B config substituted by the tiny one (the table's model substitution)."""
    (block,) = python_blocks()
    assert 'Config.from_name("tiny_LLaMA_1b")' in block
    scope = {}
    exec(block.replace('"tiny_LLaMA_1b"', '"micro"'), scope)
    assert scope["logits"].shape == (2, 16, scope["config"].padded_vocab_size)
    assert torch.isfinite(scope["logits"]).all()


def test_commands_are_found_in_blocks_inline_and_across_continuations(tmp_path, monkeypatch):
    import tests.documented as documented

    page = tmp_path / "page.md"
    page.write_text("Run `python generate/base.py --prompt 'a b'` or `python DIR/script.py`.\n\n```bash\n"
                    "# a comment\npip install x && python pretrain/demo.py --max_steps 3 \\\n"
                    "    --out_dir out/x\n```\n")
    monkeypatch.setattr(documented, "PAGES", [page])
    monkeypatch.setattr(documented, "ROOT", Path(ROOT))
    assert list(documented.documented_commands()) == [
        "pip install x", "python pretrain/demo.py --max_steps 3 --out_dir out/x",
        "python generate/base.py --prompt 'a b'"]


def test_a_test_may_change_only_what_the_table_allows():
    import pytest

    from tests.documented import documented

    command = "python generate/base.py --checkpoint_dir out/demo/final --prompt 'def ' --max_new_tokens 100 " \
              "--temperature 0.8 --top_k 200 --top_p 0.95"
    argv = documented(command, replace={"--checkpoint_dir": "/tmp/ckpt", "--max_new_tokens": 3},
                      add={"--device": "cpu"})
    assert argv == ["generate/base.py", "--checkpoint_dir", "/tmp/ckpt", "--prompt", "def ", "--max_new_tokens", "3",
                    "--temperature", "0.8", "--top_k", "200", "--top_p", "0.95", "--device", "cpu"]
    with pytest.raises(AssertionError, match="allows no change"):
        documented(command, replace={"--temperature": "0"})
    with pytest.raises(AssertionError, match="allows no test to add"):
        documented(command, add={"--seed": "1"})
    undocumented = "python generate/base.py --checkpoint_dir out/demo/final"  # a variable: the scan skips it
    with pytest.raises(AssertionError, match="no page of the docs shows"):
        documented(undocumented)
