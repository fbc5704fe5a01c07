"""What a run refuses and how it says so (issue 8: #4, #6, #8, #10): absurd hyperparameters, non-finite weights at
a checkpoint, broken or mixed-up checkpoints under --resume, and the files a data-mix prefix matched. Single-process
runs of the micro model in this process, on shards made here."""

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoint import load_state_dict
from model import Config
from packed_dataset import training_batches
from pretrain.tinyllama import setup
from shard_format import PackedDatasetBuilder, write_manifest
from test_training import SETTINGS, logged
import training_state
from training import build_model, fit, launch_fabric
from training_state import last_checkpoint_hint
from utils import UserError

SEQ_LEN = 16


def write_shards(directory: Path, prefix: str, n_blocks: int) -> None:
    """n_blocks blocks of SEQ_LEN + 1 random tokens, 4 to a file."""
    builder = PackedDatasetBuilder(directory, prefix, chunk_size=4 * (SEQ_LEN + 1), vocab_size=256)
    builder.add_array(np.random.default_rng(0).integers(0, 256, n_blocks * (SEQ_LEN + 1)).astype(np.uint16))
    builder.finish()
    write_manifest(directory)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("data")
    write_shards(directory, "train_a", n_blocks=16)
    return directory


def short_run(out_dir: Path, data_dir: Path, **overrides) -> int:
    """Two steps of the micro model, a checkpoint after each."""
    args = dict(
        model_name="micro", out_dir=out_dir, train_data_dir=data_dir, val_data_dir=None, train_data_mix="train_a",
        tokenizer_dir=None, accelerator="cpu", devices=1, precision="32-true", seq_len=SEQ_LEN, global_batch_size=4,
        micro_batch_size=2, max_steps=2, learning_rate=1e-2, min_lr=1e-3, warmup_steps=1, log_interval=1,
        save_interval=1,
    )
    return setup(**{**args, **overrides})


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir) -> Path:
    """The out_dir of a two-step run: step-1, step-2 and final/. Tests copy what they break."""
    out = tmp_path_factory.mktemp("run") / "out"
    short_run(out, data_dir)
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("logs", "tensorboard"))
    return out


# ---- #4: hyperparameters and non-finite weights ---------------------------------------------------------------


@pytest.mark.parametrize("flag, value", [
    ("learning_rate", float("inf")), ("learning_rate", float("nan")), ("min_lr", float("nan")),
    ("grad_clip", float("nan")), ("grad_clip", float("inf")), ("max_time", float("inf")), ("eps", 0.0),
    ("eps", float("nan")), ("beta1", 1.0), ("beta2", float("nan")), ("weight_decay", float("inf")),
    ("weight_decay", -0.1),
])
def test_absurd_hyperparameters_are_refused_up_front_naming_the_flag(tmp_path, data_dir, flag, value):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=f"^--{flag} must be"):
        short_run(out, data_dir, **{flag: value})
    assert not out.exists()  # refused before the processes are launched


@pytest.mark.parametrize("flags, message", [
    (dict(strategy="ddp", fsdp_cpu_offload=True), "--fsdp_cpu_offload needs --strategy fsdp, got --strategy ddp"),
    (dict(strategy="ddp", fsdp_sharding="grad_op"), "--fsdp_sharding grad_op needs --strategy fsdp"),
    (dict(fsdp_sharding="hybrid"), "--fsdp_sharding hybrid shards within a node and replicates across nodes: it "
                                   "needs --num_nodes of at least 2, got 1"),
    (dict(fsdp_sharding="zero3"), "--fsdp_sharding 'zero3': expected one of full, hybrid, grad_op"),
    (dict(rope_condense_ratio=0), "--rope_condense_ratio must be at least 1, got 0"),
])
def test_memory_and_context_options_that_cannot_apply_are_refused_up_front(tmp_path, data_dir, flags, message):
    with pytest.raises(UserError, match=re.escape(message)):
        short_run(tmp_path / "out", data_dir, **flags)
    assert not (tmp_path / "out").exists()


def test_non_finite_weights_are_never_saved(tmp_path, data_dir):
    """AdamW with eps 0 (past the up-front check) divides 0 by 0 for the embedding rows of tokens the step did not
    see: the loss and the gradient stay finite, the weights do not. The checkpoint must not be written."""
    out = tmp_path / "out"
    fabric = launch_fabric("1", 1, "cpu", "fsdp", "32-true", out, None)
    config = Config.from_name("micro")
    model = build_model(fabric, config, 0, None, compile=False)
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=1e-3, eps=0.0))
    train_data = training_batches(data_dir, "train_a", SEQ_LEN + 1, 2, 0, 1, 0)
    settings = replace(SETTINGS, out_dir=out, global_batch_size=2, micro_batch_size=2, seq_len=SEQ_LEN,
                       save_interval=1)
    message = r"inf or NaN after step 1 .*: not saving .*step-00000001\. No checkpoint was saved: start again"
    with pytest.raises(FloatingPointError, match=message):
        fit(fabric, model, optimizer, config, train_data, None, settings, {})
    assert logged(out)[1]["loss"] < 10  # the step itself looked healthy
    assert not list(out.glob("*step-*"))


# ---- #6: --resume auto skips broken checkpoints ------------------------------------------------------------


def test_resume_auto_skips_broken_checkpoints_with_a_warning(run, tmp_path, data_dir, capsys):
    """A truncated step-2, a 0-byte step-3 and an empty step-4/ above a sound step-1: the run resumes from step-1
    and reproduces the uninterrupted run's steps 2 and 3."""
    out = copy_run(run, tmp_path)
    step2 = out / "step-00000002"
    step2.write_bytes(step2.read_bytes()[:1000])
    (out / "step-00000003").write_bytes(b"")
    (out / "step-00000004").mkdir()
    capsys.readouterr()
    short_run(out, data_dir, max_steps=3, resume="auto")
    printed = capsys.readouterr().out
    assert f"Warning: --resume auto skips step-00000004: {out / 'step-00000004'} is an empty directory" in printed
    assert f"Warning: --resume auto skips step-00000003: {out / 'step-00000003'} is empty (0 bytes)" in printed
    assert f"Warning: --resume auto skips step-00000002: {step2} cannot be read (PytorchStreamReader failed" in printed
    assert f"Resuming from {out / 'step-00000001'}" in printed
    straight = tmp_path / "straight"
    short_run(straight, data_dir, max_steps=3)
    assert {step: row["loss"] for step, row in logged(out).items() if step > 1} == {
        step: row["loss"] for step, row in logged(straight).items() if step > 1}


def test_resume_auto_with_no_loadable_checkpoint_and_an_explicit_broken_one_are_errors(run, tmp_path, data_dir):
    out = copy_run(run, tmp_path)
    for path in out.glob("step-*"):
        path.write_bytes(b"")
    message = f"--resume auto: no checkpoint in {out} can be resumed: {out / 'step-00000002'} is empty"
    with pytest.raises(ValueError, match=re.escape(message)):
        short_run(out, data_dir, resume="auto")
    with pytest.raises(ValueError, match=re.escape(f"--resume {out / 'step-00000001'}: {out / 'step-00000001'} is "
                                                   f"empty (0 bytes)")):
        short_run(tmp_path / "other", data_dir, resume=out / "step-00000001")


# ---- #8: checkpoint mix-ups get one sentence naming the file ------------------------------------------------


def test_resuming_from_final_weights_or_an_empty_directory_says_what_they_are(run, tmp_path, data_dir):
    final = run / "final"
    cases = {
        final: f"--resume {final}: {final} is a directory of final weights (lit_model.pth, model_config.json) "
               f"without the optimizer and data position: start from them with --initial_checkpoint_dir {final}",
        final / "lit_model.pth": f"{final / 'lit_model.pth'} holds model weights only (a lit_model.pth), without "
                                 f"the optimizer and data position: start from them with --initial_checkpoint_dir "
                                 f"{final}",
    }
    empty = tmp_path / "step-00000007"
    empty.mkdir()
    cases[empty] = f"{empty} is an empty directory: expected a step-N file, or a step-N directory of FSDP shards"
    for path, message in cases.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            short_run(tmp_path / "out", data_dir, resume=path)


def test_broken_weights_and_config_files_are_named(run, tmp_path):
    weights = tmp_path / "lit_model.pth"
    cases = {
        b"": f"{weights} is empty (0 bytes): expected a file written by torch.save",
        (run / "final" / "lit_model.pth").read_bytes()[:500]: f"{weights} cannot be read (PytorchStreamReader failed "
                                                              f"reading zip archive",
    }
    for content, message in cases.items():
        weights.write_bytes(content)
        with pytest.raises(ValueError, match=re.escape(message)):
            load_state_dict(weights)
    torch.save([torch.zeros(2)], weights)
    with pytest.raises(ValueError, match=re.escape(f"{weights} holds a list: expected a state dict")):
        load_state_dict(weights)

    config = tmp_path / "model_config.json"
    config.write_text('{"name": "micro",')
    with pytest.raises(ValueError, match=re.escape(f"{config} is not valid JSON (")):
        Config.from_file(config)
    config.write_text(json.dumps(["micro"]))
    with pytest.raises(ValueError, match=re.escape(f"{config} holds a JSON list: expected an object")):
        Config.from_file(config)


# ---- #10: which files a data-mix prefix matched -------------------------------------------------------------


def test_the_files_each_prefix_matched_are_printed_once(tmp_path, capsys):
    write_shards(tmp_path, "train_code", n_blocks=8)  # 2 files
    write_shards(tmp_path, "train_code_extra", n_blocks=4)  # matched by train_code* too
    write_shards(tmp_path, "train_web", n_blocks=4)
    training_batches(tmp_path, "train_code:0.5,train_web:0.5", SEQ_LEN + 1, 2, 0, num_processes=2, process_rank=0)
    names = sorted(path.name for path in tmp_path.glob("train_code*"))
    assert len(names) == 3 and names[-1].startswith("train_code_extra")
    (web,) = tmp_path.glob("train_web*")
    assert capsys.readouterr().out.splitlines() == [
        f"--train_data_mix 'train_code': 3 files, {names[0]} ... {names[-1]}, 12 blocks of 17 tokens (204 tokens)",
        f"--train_data_mix 'train_web': 1 file, {web.name}, 4 blocks of 17 tokens (68 tokens)",
    ]
    training_batches(tmp_path, "train_code:0.5,train_web:0.5", SEQ_LEN + 1, 2, 0, num_processes=2, process_rank=1)
    assert capsys.readouterr().out == ""  # rank 0 only


# ---- what a failure says: another model, a failed write, a divergence (issue 18) ---------------------------------


def test_resuming_a_checkpoint_of_another_model_names_both_configs(run, tmp_path, data_dir):
    """Before: torch's "loaded state dict contains a parameter group that doesn't match the size of optimizer's
    group", from the optimizer's state, loaded first."""
    out = copy_run(run, tmp_path)
    message = (f"{out / 'step-00000002'} is a checkpoint of another model than this run's 'demo': name 'micro' (this "
               f"run: 'demo'), block_size 64 (this run: 256), vocab_size 256 (this run: 4096)")
    with pytest.raises(UserError, match=re.escape(message)):
        short_run(out, data_dir, model_name="demo", resume="auto", max_steps=3)


def test_a_failed_checkpoint_write_names_the_path_and_keeps_the_previous_one(tmp_path, data_dir, monkeypatch):
    """A full disk, as torch reports it mid-write: one line naming the checkpoint, and step-1 resumes."""
    real_save, calls = training_state.save_atomic, []

    def disk_full_on_the_second(obj, path):
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1408 vs 1296")
        real_save(obj, path)

    monkeypatch.setattr(training_state, "save_atomic", disk_full_on_the_second)
    out = tmp_path / "out"
    message = (f"Writing {out / 'step-00000002'} failed ([enforce fail at inline_container.cc:672] . unexpected pos "
               f"1408 vs 1296): is the disk full? The previous checkpoint {out / 'step-00000001'} is kept: make room "
               f"and rerun the same command with --resume auto")
    with pytest.raises(UserError, match=re.escape(message)):
        short_run(out, data_dir)
    assert sorted(path.name for path in out.iterdir() if path.name.startswith(("step", ".step"))) == ["step-00000001"]
    monkeypatch.setattr(training_state, "save_atomic", real_save)
    assert short_run(out, data_dir, resume="auto") == 2


def test_after_a_divergence_the_error_names_no_checkpoint_whose_weights_diverged(tmp_path, data_dir):
    """--learning_rate 1e9: step-1 is written with finite weights, but step 2 computed with them is NaN, so it is
    not offered; at 1e3 the run collapses to uniform output and then fails, and the last checkpoint whose weights gave
    a loss near the first one's is named."""
    with pytest.raises(FloatingPointError, match=r"at step 2 .* No checkpoint is known to be sane \(a loss at most "
                                                 r"6\.55 with its weights\): step-00000001: step 2 had loss nan\."):
        short_run(tmp_path / "1e9", data_dir, learning_rate=1e9, min_lr=0.0, warmup_steps=0, max_steps=8)
    out = tmp_path / "1e3"
    with pytest.raises(FloatingPointError, match=re.escape(
            f"The last checkpoint whose weights gave a sane loss is {out / 'step-00000005'}: step 6 had loss 5.5452. "
            f"Resume from it with --resume {out / 'step-00000005'}")):
        short_run(out, data_dir, learning_rate=1e3, min_lr=0.0, warmup_steps=0, max_steps=8)


def test_the_sane_checkpoint_is_judged_by_the_loss_its_weights_gave(tmp_path):
    for step in (1, 2, 3):
        (tmp_path / f"step-{step:08d}").write_bytes(b"x")
    hint = last_checkpoint_hint(tmp_path, {2: 3.0, 3: 1e6, 4: float("inf")}, vocab_size=256)
    assert hint.startswith(f"The last checkpoint whose weights gave a sane loss is {tmp_path / 'step-00000001'}: "
                           f"step 2 had loss 3.0000 (not the newer step-00000003: step 4 had loss inf, step-00000002: "
                           f"step 3 had loss 1e+06)")
    assert "not run in this process" in last_checkpoint_hint(tmp_path, {}, vocab_size=256)
    assert last_checkpoint_hint(tmp_path / "none", {}, 256) == ("No checkpoint was saved: start again with a lower "
                                                                 "--learning_rate.")
