"""Every script ends bad input with one line, `PROG: error: ...`, and exit status 2: a path it is given that does not
exist (where it reads one), and a value it cannot take. Each script is run in this process as `python SCRIPT FLAGS`
runs it (runpy, with its argv), and two in a subprocess too. The values are checked before any heavy work (a corpus
built, a model loaded), so the whole table takes seconds."""

import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT_FOLDERS = ("pretrain", "finetune", "generate", "eval", "inheritune", "prepare_data", "scripts", "bench")
# Flags that keep a training script on one CPU process, so that it gets as far as the input it is given
CPU = ["--accelerator", "cpu", "--devices", "1", "--precision", "32-true"]

# script -> (the argv of a missing path, or why it reads no path; the argv of an invalid value, what the line names).
# {missing} is a path that does not exist, {checkpoint} conftest's tiny trained checkpoint, {bad} a directory of
# files that do not parse (a zero-byte shard, an HF config.json cut short), {tmp} an empty directory.
CASES = {
    "pretrain/tinyllama.py": (
        ["--train_data_dir", "{missing}", "--model_name", "micro", "--tokenizer_dir", "none", "--out_dir", "{tmp}/out",
         "--global_batch_size", "1", "--micro_batch_size", "1", *CPU],
        (["--micro_batch_size", "0", *CPU], "--micro_batch_size"),
    ),
    "pretrain/amd_llama_135m.py": (
        ["--tokenizer_dir", "{missing}", "--out_dir", "{tmp}/out", *CPU],
        (["--warmup_steps", "-1", *CPU], "--warmup_steps"),
    ),
    "pretrain/tinyllama_code.py": (
        ["--initial_checkpoint_dir", "{missing}", "--out_dir", "{tmp}/out", *CPU],
        (["--fsdp_sharding", "hybrid", *CPU], "--fsdp_sharding hybrid"),
    ),
    "pretrain/tinyllama_code_8k.py": (
        ["--initial_checkpoint_dir", "{missing}", "--out_dir", "{tmp}/out", *CPU],
        (["--rope_condense_ratio", "0", *CPU], "--rope_condense_ratio"),
    ),
    "pretrain/demo.py": (
        "its data_dir is built where it is missing; it reads no other path",
        (["--max_steps", "0", "--data_dir", "{missing}"], "--max_steps"),
    ),
    "finetune/sft.py": (
        ["--data_dir", "{missing}", "--initial_checkpoint_dir", "{checkpoint}", "--out_dir", "{tmp}/out", *CPU],
        (["--lora_r", "0", "--data_dir", "{missing}", *CPU], "--lora_r"),
    ),
    "finetune/lora.py": (
        ["--initial_checkpoint_dir", "{missing}", "--data_dir", "{missing}", "--out_dir", "{tmp}/out", *CPU],
        (["--lora_dropout", "1.5", *CPU], "--lora_dropout"),
    ),
    "finetune/amd_llama_135m_code.py": (
        ["--initial_checkpoint_dir", "{missing}", "--out_dir", "{tmp}/out", *CPU],
        (["--epochs", "0", *CPU], "--epochs"),
    ),
    "finetune/demo.py": (
        ["--checkpoint_dir", "{missing}", "--data_dir", "{tmp}/data"],
        (["--checkpoint_dir", "{checkpoint}", "--data_dir", "{tmp}/data", "--max_steps", "0"], "--max_steps"),
    ),
    "generate/base.py": (
        ["--checkpoint_dir", "{missing}"],
        (["--checkpoint_dir", "{checkpoint}", "--max_new_tokens", "0"], "--max_new_tokens"),
    ),
    "generate/chat.py": (
        ["--checkpoint_dir", "{missing}", "--prompt", "Hi"],
        (["--checkpoint_dir", "{checkpoint}", "--prompt", "Hi", "--temperature", "-1"], "--temperature"),
    ),
    "generate/speculative.py": (
        ["--checkpoint_dir", "{missing}", "--draft_checkpoint_dir", "{checkpoint}"],
        (["--checkpoint_dir", "{checkpoint}", "--draft_checkpoint_dir", "{checkpoint}", "--speculative_k", "0"],
         "--speculative_k"),
    ),
    "generate/serve.py": (
        ["--checkpoint_dir", "{missing}"],
        (["--checkpoint_dir", "{checkpoint}", "--max_batch_size", "0"], "--max_batch_size"),
    ),
    "eval/lm_eval_harness.py": (
        ["--checkpoint_dir", "{missing}", "--tasks", "arc_easy"],
        (["--checkpoint_dir", "{checkpoint}", "--tasks", "arc_easy", "--batch_size", "0"], "--batch_size"),
    ),
    "eval/perplexity.py": (
        ["--checkpoint_dir", "{checkpoint}", "--data_dir", "{missing}", "--device", "cpu"],
        (["--checkpoint_dir", "{checkpoint}", "--data_dir", "{tmp}", "--micro_batch_size", "0"], "--micro_batch_size"),
    ),
    "inheritune/attention_rank.py": (
        ["--checkpoint_dir", "{checkpoint}", "--data_dir", "{missing}", "--seq_len", "16", "--device", "cpu"],
        (["--checkpoint_dir", "{checkpoint}", "--data_dir", "{tmp}", "--threshold", "2"], "--threshold"),
    ),
    "inheritune/grow.py": (
        ["--ref_checkpoint_dir", "{missing}", "--train_data_dir", "{tmp}", "--val_data_dir", "{tmp}",
         "--max_steps", "1", "--out_dir", "{tmp}/out"],
        (["--ref_checkpoint_dir", "{checkpoint}", "--train_data_dir", "{tmp}", "--val_data_dir", "{tmp}",
          "--max_steps", "1", "--out_dir", "{tmp}/out", "--step_layers", "0"], "--step_layers"),
    ),
    "inheritune/init_from.py": (
        ["--ref_checkpoint_dir", "{missing}", "--out_dir", "{tmp}/out"],
        (["--ref_checkpoint_dir", "{checkpoint}", "--out_dir", "{tmp}/out", "--n_layers", "9"], "--n_layers"),
    ),
    "inheritune/reproduce.py": (
        "its data_dir is built where it is missing; it reads no other path",
        (["--preset", "tiny", "--data_dir", "{missing}", "--max_steps", "0"], "--max_steps"),
    ),
    "prepare_data/prepare_demo.py": (
        "it reads the standard library and builds its destination",
        (["--destination_path", "{tmp}/demo", "--validation_fraction", "2"], "--validation_fraction"),
    ),
    "prepare_data/prepare_sft.py": (
        ["--source_path", "{missing}", "--checkpoint_dir", "{checkpoint}", "--destination_path", "{tmp}/out"],
        (["--source_path", "{missing}", "--checkpoint_dir", "{checkpoint}", "--destination_path", "{tmp}/out",
          "--val_fraction", "2"], "--val_fraction"),
    ),
    "prepare_data/prepare_sft_demo.py": (
        ["--tokenizer_dir", "{missing}", "--destination_path", "{tmp}/sft"],
        (["--tokenizer_dir", "{checkpoint}", "--destination_path", "{tmp}/sft", "--max_examples", "0"],
         "--max_examples"),
    ),
    "prepare_data/prepare_slimpajama.py": (
        ["--source_path", "{missing}", "--tokenizer_path", "{checkpoint}", "--destination_path", "{tmp}/out"],
        (["--source_path", "{missing}", "--tokenizer_path", "{checkpoint}", "--destination_path", "{tmp}/out",
          "--exclude_sets", "RedPajamaGitHub"], "--exclude_sets"),
    ),
    "prepare_data/prepare_starcoder.py": (
        ["--source_path", "{missing}", "--tokenizer_path", "{checkpoint}", "--destination_path", "{tmp}/out"],
        (["--source_path", "{checkpoint}/tokenizer.model", "--tokenizer_path", "{checkpoint}", "--destination_path",
          "{tmp}/out", "--chunk_size", "0"], "--chunk_size"),
    ),
    "prepare_data/prepare_text.py": (
        ["--source_path", "{missing}", "--tokenizer_path", "{checkpoint}", "--destination_path", "{tmp}/out"],
        (["--source_path", "{missing}", "--tokenizer_path", "{checkpoint}", "--destination_path", "{tmp}/out",
          "--validation_fraction", "2"], "--validation_fraction"),
    ),
    "prepare_data/train_tokenizer.py": (
        ["--source_path", "{missing}", "--destination_path", "{tmp}/out"],
        (["--source_path", "{missing}", "--destination_path", "{tmp}/out", "--vocab_size", "0"], "--vocab_size"),
    ),
    "prepare_data/write_manifest.py": (
        ["--directory", "{missing}"],
        (["--directory", "{bad}"], "{bad}/empty.bin"),
    ),
    "scripts/check_imports.py": (
        ["--lock", "{missing}"],
        (["--paths", "no_such_file_*.py"], "--paths"),
    ),
    "scripts/convert_gguf_checkpoint.py": (
        ["--gguf_file", "{missing}", "--out_dir", "{tmp}/out"],
        (["--gguf_file", "{bad}/config.json", "--out_dir", "{tmp}/out"], "{bad}/config.json"),
    ),
    "scripts/convert_hf_checkpoint.py": (
        ["--checkpoint_dir", "{missing}"],
        (["--checkpoint_dir", "{bad}"], "{bad}/config.json"),
    ),
    "scripts/convert_lit_checkpoint.py": (
        ["--checkpoint_dir", "{missing}", "--output_dir", "{tmp}/hf"],
        (["--checkpoint_dir", "{checkpoint}", "--output_dir", "{checkpoint}"], "--output_dir"),
    ),
    "scripts/quantize.py": (
        ["--checkpoint_dir", "{missing}", "--out_dir", "{tmp}/q"],
        (["--checkpoint_dir", "{checkpoint}", "--out_dir", "{tmp}/q", "--mode", "int4", "--group_size", "48"],
         "--group_size 48"),
    ),
    "scripts/convert_to_gguf.py": (
        ["--checkpoint_dir", "{missing}", "--out_file", "{tmp}/model.gguf"],
        (["--checkpoint_dir", "{checkpoint}", "--out_file", "{tmp}/model.gguf", "--type", "q4_k"], "--type"),
    ),
    "scripts/lock_requirements.py": (
        ["--torch_find_links", "{missing}"],
        (["--torch_version", "latest"], "--torch_version"),
    ),
    "bench/eval_throughput.py": (
        "it times random weights on synthetic tasks: it reads no path",
        (["--model_name", "no_such_model"], "--model_name"),
    ),
    "bench/gpu_suite.py": (
        "it builds random models and writes --output: it reads no path",
        (["--budget_s", "0", "--dry_run"], "--budget_s"),
    ),
    "bench/generate_throughput.py": (
        "it times random weights: it reads no path",
        (["--model_name", "no_such_model"], "--model_name"),
    ),
    "bench/quantized_decode.py": (
        "it times random weights: it reads no path",
        (["--model_name", "no_such_model"], "--model_name"),
    ),
    "bench/quantized_kernels.py": (
        "it times random weights: it reads no path",
        (["--model_name", "no_such_model"], "--model_name"),
    ),
    "bench/serving.py": (
        ["--tokenizer_dir", "{missing}"],
        (["--tokenizer_dir", "{checkpoint}", "--clients", "0"], "--clients"),
    ),
    "bench/speculative.py": (
        ["--target_dir", "{missing}", "--draft_dir", "{checkpoint}"],
        (["--target_dir", "{checkpoint}", "--draft_dir", "{checkpoint}", "--n_prompts", "0"], "--n_prompts"),
    ),
    "bench/train_throughput.py": (
        "it times random weights: it reads no path",
        (["--model_name", "no_such_model"], "--model_name"),
    ),
}


def scripts_with_a_cli() -> list:
    return sorted(str(path.relative_to(ROOT)) for folder in SCRIPT_FOLDERS for path in (ROOT / folder).glob("*.py")
                  if "cli(" in path.read_text())


def test_every_script_with_a_command_line_has_its_cases():
    assert scripts_with_a_cli() == sorted(CASES)


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("bad")
    (directory / "empty.bin").write_bytes(b"")
    (directory / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    for name in ("model_config.json", "sft_metadata.json"):
        (directory / name).write_text("{")
    return directory


@pytest.fixture
def paths(tmp_path, trained, bad) -> dict:
    """What the {placeholders} of CASES stand for."""
    return dict(missing=tmp_path / "missing", checkpoint=trained.checkpoint_dir, bad=bad, tmp=tmp_path)


def filled(flags: list, paths: dict) -> list:
    return [flag.format(**paths) for flag in flags]


def run_in_process(script: str, flags: list, monkeypatch, capsys) -> str:
    """The one line a script prints to stderr when run with `flags`, after checking that it exits with 2."""
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), *flags])
    monkeypatch.setattr(sys, "path", list(sys.path))  # each script puts the repository root in front
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{Path(script).name}: error: "), err
    return lines[0]


@pytest.mark.parametrize("script", [script for script in sorted(CASES) if isinstance(CASES[script][0], list)])
def test_a_missing_path_is_one_line(script, paths, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a script's default paths are relative: none of them may be the repository's
    line = run_in_process(script, filled(CASES[script][0], paths), monkeypatch, capsys)
    assert str(paths["missing"]) in line


@pytest.mark.parametrize("script", sorted(CASES))
def test_an_invalid_value_is_one_line(script, paths, tmp_path, monkeypatch, capsys):
    flags, named = CASES[script][1]
    monkeypatch.chdir(tmp_path)
    line = run_in_process(script, filled(flags, paths), monkeypatch, capsys)
    assert named.format(**paths) in line


@pytest.mark.parametrize("script, flags, named", [
    ("generate/base.py", ["--checkpoint_dir", "{missing}"], "{missing}"),
    ("prepare_data/prepare_text.py", ["--source_path", "{missing}", "--validation_fraction", "2"],
     "--validation_fraction"),
])
def test_a_script_run_as_a_command_prints_one_line_and_exits_with_2(script, flags, named, paths, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / script), *filled(flags, paths)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and named.format(**paths) in result.stderr, result.stderr


@pytest.mark.parametrize("script, flags, named", [
    ("pretrain/tinyllama.py", ["--model_name", "no_such_model", *CPU], "--model_name"),
    ("pretrain/tinyllama.py", ["--initial_checkpoint_dir", "{bad}", *CPU], "{bad}/model_config.json"),
    ("finetune/sft.py", ["--initial_checkpoint_dir", "{checkpoint}", "--data_dir", "{bad}", *CPU],
     "{bad}/sft_metadata.json"),
    ("scripts/convert_lit_checkpoint.py", ["--checkpoint_dir", "{tmp}/template", "--output_dir", "{tmp}/hf"],
     "{tmp}/template/tokenizer_config.json"),
])
def test_a_name_that_is_no_config_and_files_that_do_not_parse_are_one_line(script, flags, named, paths, tmp_path,
                                                                             monkeypatch, capsys):
    shutil.copytree(paths["checkpoint"], tmp_path / "template")
    (tmp_path / "template" / "tokenizer_config.json").write_text('{"chat_template": ')
    monkeypatch.chdir(tmp_path)
    line = run_in_process(script, filled(flags, paths), monkeypatch, capsys)
    assert named.format(**paths) in line


@pytest.mark.parametrize("script, flags, named", [
    ("pretrain/tinyllama.py", ["--teacher_checkpoint_dir", "{checkpoint}", "--kd_alpha", "1.5", *CPU], "--kd_alpha"),
    ("finetune/sft.py", ["--teacher_checkpoint_dir", "{checkpoint}", "--kd_temperature", "0", "--data_dir",
                         "{missing}", *CPU], "--kd_temperature"),
    ("finetune/sft.py", ["--teacher_checkpoint_dir", "{missing}", "--data_dir", "{missing}", *CPU],
     "--teacher_checkpoint_dir {missing}"),
])
def test_bad_distillation_flags_are_one_line(script, flags, named, paths, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = run_in_process(script, filled(flags, paths), monkeypatch, capsys)
    assert named.format(**paths) in line
