"""The layout's import rules: library code lives in root modules and scripts in folders; a root module imports no
script; a script imports another folder's script only for that script's entry function (the function its
`cli(...)` runs), from the explicit allowlist below. Same-folder imports are a folder's own business. utils.py and
model.py import nothing of the repository; generation, chat and evaluation load neither the training nor the other
stacks."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.check_imports import imports_of

ROOT = Path(__file__).resolve().parent.parent
SCRIPT_FOLDERS = ("bench", "eval", "finetune", "generate", "inheritune", "prepare_data", "pretrain", "scripts")
# script -> its entry function, which scripts of other folders may call (a demo runs a preparer, a recipe the loop)
ENTRY_FUNCTIONS = {
    "pretrain.tinyllama": "setup",
    "prepare_data.prepare_demo": "prepare_demo",
    "prepare_data.prepare_sft_demo": "build_sft_demo_data",
    "prepare_data.prepare_slimpajama": "main",
    "prepare_data.train_tokenizer": "main",
    "generate.chat": "main",
    "scripts.convert_lit_checkpoint": "convert_lit_checkpoint",
}


def imports(file: Path):
    """(module, name) of every import in `file`, inside functions too; name None for `import module`."""
    for imp in imports_of(file):
        yield from ((imp.module, name) for name in imp.names) if imp.names else [(imp.module, None)]


def test_a_script_imports_another_folders_script_only_for_its_entry_function():
    crossing = sorted(
        (f"{folder}/{file.name}", f"{module}.{name}")
        for folder in SCRIPT_FOLDERS for file in (ROOT / folder).glob("*.py")
        for module, name in imports(file)
        if module.split(".")[0] in SCRIPT_FOLDERS and module.split(".")[0] != folder
        and ENTRY_FUNCTIONS.get(module) != name
    )
    assert crossing == []


def test_the_allowlist_names_each_scripts_entry_function():
    for module, function in ENTRY_FUNCTIONS.items():
        tree = ast.parse((ROOT / f"{module.replace('.', '/')}.py").read_text())
        runs = {call.args[0].id for call in ast.walk(tree) if isinstance(call, ast.Call)
                and getattr(call.func, "id", None) == "cli" and call.args and isinstance(call.args[0], ast.Name)}
        assert runs == {function}, module


def test_root_modules_import_no_script():
    for file in ROOT.glob("*.py"):
        imported = {module.split(".")[0] for module, _ in imports(file)}
        assert not imported & set(SCRIPT_FOLDERS), file.name


@pytest.mark.parametrize("module, allowed", [("utils.py", set()), ("model.py", {"torch"})])
def test_the_lowest_modules_import_nothing_of_the_repository(module, allowed):
    """utils.py imports neither torch nor the repository (data preparation imports it); model.py only torch."""
    imported = {name.split(".")[0] for name, _ in imports(ROOT / module)}
    repository = {path.stem for path in ROOT.glob("*.py")} | set(SCRIPT_FOLDERS)
    assert not imported & (repository | {"torch"} - allowed)


@pytest.mark.parametrize("modules, absent", [
    # generation, chat and speculative decoding: the checkpoint loader, not the training or evaluation stacks
    ("generation, speculative, generate.base, generate.chat, generate.speculative, checkpoint, hf, chat_template, lora",
     ("lightning_fabric", "training", "transformers", "lm_eval")),
    # the evaluation runs lm-eval on our model, never on transformers
    ("lm_eval_model, eval.perplexity", ("transformers",)),
])
def test_generation_chat_and_eval_never_load_what_they_do_not_use(modules, absent):
    check = f"import sys; import {modules}; print(sorted(name for name in {absent!r} if name in sys.modules))"
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
