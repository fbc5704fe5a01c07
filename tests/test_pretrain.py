"""pretrain/tinyllama.py (and the AMD recipes that reuse its loop) on tiny models and data made here, on the CPU.

Single-process runs call setup() in this process; multi-process runs launch the script itself (--devices 2
--accelerator cpu), which exercises fabric.launch() and gloo. References are independent of the code under test:
an uninterrupted run for resume, one process for DDP/FSDP, closed-form values for the schedule and the batch
arithmetic, names and counts taken from the model or the files for parameter groups and epochs.
"""

import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator, List, Tuple

import numpy as np
import pytest
import torch

from checkpoint import save_model_dir
from model import GPT, Config
from packed_dataset import PackedDataset
from pretrain.demo import demo
from pretrain.tinyllama import setup
from shard_format import PackedDatasetBuilder, write_manifest
from training import get_lr, gradient_accumulation_steps
from tests.documented import documented
from tests.documented import run_script as run_in_process
from tokenizer import TOKENIZER_FILES, Tokenizer
from utils import UserError

ROOT = Path(__file__).resolve().parent.parent
SEQ_LEN = 16
TOKENS_PER_STEP = 8 * SEQ_LEN  # global batch 8
# one thread per process: two processes share the 2 cores, and every run being compared uses the same setting
ONE_THREAD = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
ENV = {**os.environ, **ONE_THREAD}


def write_shards(directory: Path, prefix: str, n_blocks: int, blocks_per_file: int = 4, seed: int = 0) -> None:
    """Exactly n_blocks blocks of SEQ_LEN + 1 tokens (no tail), learnable: arithmetic progressions mod 256."""
    rng = np.random.default_rng(seed)
    block = SEQ_LEN + 1
    builder = PackedDatasetBuilder(directory, prefix, chunk_size=block * blocks_per_file, vocab_size=256)
    remaining = n_blocks * block
    while remaining:
        document = (rng.integers(256) + rng.integers(1, 7) * np.arange(rng.integers(10, 60))) % 256
        document = document[:remaining]
        builder.add_array(document.astype(np.uint16))
        remaining -= len(document)
    builder.finish()
    write_manifest(directory)


@pytest.fixture(scope="module")
def data_dir(pretrain_shards) -> Path:
    """train_a (64 blocks), train_b (40) and validation_a (16), made by write_shards (tests/conftest.py: a session's,
    as the two-process runs on them, `distributed_runs`, are)."""
    return pretrain_shards


def run_args(out_dir: Path, data_dir: Path, **overrides) -> dict:
    args = dict(
        model_name="micro", out_dir=out_dir, train_data_dir=data_dir, val_data_dir=data_dir,
        train_data_mix="train_a:0.7,train_b:0.3", tokenizer_dir=None, accelerator="cpu", devices=1,
        precision="32-true", seq_len=SEQ_LEN, global_batch_size=8, micro_batch_size=2, max_steps=6,
        learning_rate=1e-2, min_lr=1e-3, warmup_steps=2, log_interval=1, eval_interval=3, eval_iters=8,
        save_interval=3,
    )
    return {**args, **overrides}


def train_here(out_dir: Path, data_dir: Path, **overrides):
    """One process, in this process."""
    return setup(**run_args(out_dir, data_dir, **overrides))


def command_line(script: str, args: dict) -> list:
    flags = []
    for name, value in args.items():
        if value is True:
            flags.append(f"--{name}")
        elif value is not False:
            flags += [f"--{name}", "none" if value is None else str(value)]
    return [sys.executable, str(ROOT / script), *flags]


def run_script(script: str, args: dict, timeout: float = 240) -> str:
    """Run a script as a user would; return its output, fail with it on a non-zero exit."""
    with launched((script, args)) as (process,):
        return finish(process, timeout)


@contextmanager
def launched(*scripts: Tuple[str, dict]) -> Iterator[List[subprocess.Popen]]:
    """(script, args) launched as a user would, in the background while the block runs (a launch spends seconds on
    imports, mostly on one core: the block's work in this process, or another launch, takes the other). Each is its
    own process group: whatever has not finished when the block ends (a failure) is killed with its children."""
    env = {**os.environ, **ONE_THREAD}  # the test's environment (its HF_HOME, offline)
    processes = [subprocess.Popen(command_line(script, args), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, start_new_session=True)
                 for script, args in scripts]
    try:
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)  # the launcher's children too: a hung gloo peer would stay
                process.communicate()


def finish(process: subprocess.Popen, timeout: float = 240) -> str:
    """Wait for a launched script; return its output, fail with it on a non-zero exit or after `timeout` s."""
    script = Path(process.args[1]).relative_to(ROOT)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{script} timed out after {timeout} s:\n{output[-5000:]}")
    assert process.returncode == 0, f"{script} failed:\n{output[-5000:]}"
    return output


def metrics(out_dir: Path) -> dict:
    """{step: {metric: value}} from the CSV logs of every run that wrote to out_dir, in order."""
    rows = {}
    versions = sorted((out_dir / "logs").glob("version_*"), key=lambda path: int(path.name.split("_")[1]))
    for version in versions:
        with open(version / "metrics.csv") as f:
            for row in csv.DictReader(f):
                values = {key: float(value) for key, value in row.items() if value and key != "step"}
                rows.setdefault(int(row["step"]), {}).update(values)
    return rows


def losses(out_dir: Path) -> dict:
    return {step: row["loss"] for step, row in metrics(out_dir).items() if "loss" in row}


def final_weights(out_dir: Path) -> dict:
    return torch.load(out_dir / "final" / "lit_model.pth", weights_only=True)


def word_level_tokenizer(directory: Path, vocab_size: int) -> Path:
    """A tokenizer.json of exactly vocab_size tokens, with <s> and </s>, as the `tokenizers` library writes it."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tokenizer = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    directory.mkdir(parents=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


# ---- the pieces, against closed forms -------------------------------------------------------------------------


def test_global_batch_not_divisible_is_a_clear_error(tmp_path, data_dir):
    with pytest.raises(ValueError, match="--global_batch_size 1024 is not a multiple of --micro_batch_size 8 x 3"):
        gradient_accumulation_steps(1024, 8, 3)
    with pytest.raises(ValueError, match="--global_batch_size 10"):
        train_here(tmp_path / "out", data_dir, global_batch_size=10, micro_batch_size=4)
    assert not (tmp_path / "out").exists()


# ---- single-process runs --------------------------------------------------------------------------------------


def test_initial_weights_are_model_py_init(tmp_path, data_dir):
    """What the loop trains from is GPT(config) after seeding: Fabric re-initialises nothing. (One step at learning
    rate 0 changes no weight: AdamW multiplies them by 1 - 0 x weight_decay and adds 0 x its update.)"""
    train_here(tmp_path / "out", data_dir, max_steps=1, learning_rate=0.0, min_lr=0.0, seed=1234)
    torch.manual_seed(1234)
    reference = GPT(Config.from_name("micro")).state_dict()
    exported = final_weights(tmp_path / "out")
    assert exported.keys() == reference.keys()
    for name in reference:
        assert torch.equal(exported[name], reference[name]), name
    assert json.loads((tmp_path / "out" / "final" / "model_config.json").read_text())["name"] == "micro"


def test_resume_reproduces_the_uninterrupted_run(tmp_path, data_dir):
    """Stopped at a checkpoint and resumed: the same losses and weights as never stopping, in fp32 on the CPU.
    Two sources with weights, several epochs of the small one: the data position and the mix RNG both matter."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_here(straight, data_dir, max_steps=12, save_interval=5)
    assert sorted(p.name for p in straight.glob("step-*")) == ["step-00000005", "step-00000010", "step-00000012"]

    resumed.mkdir()
    shutil.copy(straight / "step-00000005", resumed / "step-00000005")
    train_here(resumed, data_dir, max_steps=12, save_interval=5, resume="auto")
    expected, got = losses(straight), losses(resumed)
    assert sorted(got) == list(range(6, 13))  # no step before the checkpoint was run again
    assert {step: expected[step] for step in got} == got  # exactly
    assert metrics(resumed)[12]["val_loss"] == metrics(straight)[12]["val_loss"]
    assert metrics(resumed)[12]["tokens"] == 12 * TOKENS_PER_STEP
    weights, reference = final_weights(resumed), final_weights(straight)
    assert all(torch.equal(weights[name], reference[name]) for name in reference)

    with pytest.raises(UserError, match="--resume auto"):  # a fresh run would overwrite them
        train_here(straight, data_dir, max_steps=12)

    # an explicit path resumes too, and writes on from there
    again = tmp_path / "again"
    train_here(again, data_dir, max_steps=12, save_interval=5, resume=straight / "step-00000010")
    assert losses(again) == {step: expected[step] for step in (11, 12)}

    row = metrics(straight)[3]  # what is logged at a step
    assert {"loss", "learning_rate", "grad_norm", "tokens", "tokens_per_sec", "peak_memory_gb"} <= row.keys()
    assert row["learning_rate"] == pytest.approx(get_lr(2, 1e-2, 1e-3, 2, 12))
    assert list((straight / "tensorboard").glob("version_0/events.out.tfevents.*"))


def test_non_finite_loss_stops_and_offers_no_checkpoint_whose_weights_diverged(tmp_path, data_dir):
    """An absurd learning rate blows the weights up to inf/NaN within a few steps: the checkpoints written are complete
    and loadable, but the last one's weights gave the NaN, so the message does not offer it."""
    out = tmp_path / "out"
    with pytest.raises(FloatingPointError, match=r"Non-finite loss or gradient at step (\d+).*step-0000000") as error:
        train_here(out, data_dir, max_steps=20, save_interval=1, learning_rate=1e30, min_lr=0.0, warmup_steps=0,
                   grad_clip=1.0, val_data_dir=None)
    bad_step = int(re.search(r"at step (\d+)", str(error.value)).group(1))
    checkpoints = sorted(out.glob("step-*"))
    assert [p.name for p in checkpoints] == [f"step-{step:08d}" for step in range(1, bad_step)]
    assert "No checkpoint is known to be sane" in str(error.value)
    assert f"{checkpoints[-1].name}: step {bad_step} had loss nan" in str(error.value)
    state = torch.load(checkpoints[-1], weights_only=True)  # complete and loadable
    assert state["step"] == bad_step - 1
    assert not (out / "final").exists()


def test_max_tokens_sets_the_length_and_the_schedule(tmp_path, data_dir):
    out = tmp_path / "out"
    train_here(out, data_dir, max_steps=None, max_tokens=5 * TOKENS_PER_STEP + 100, warmup_steps=1,
               save_interval=100, eval_interval=100)
    logged = metrics(out)
    assert max(losses(out)) == 5 and logged[5]["tokens"] == 5 * TOKENS_PER_STEP
    assert [p.name for p in out.glob("step-*")] == ["step-00000005"]
    # the cosine ends at the fifth step: step index 4 of 5 with 1 warmup step is 3/4 of the way down
    assert logged[5]["learning_rate"] == pytest.approx(1e-3 + (1e-2 - 1e-3) * (1 + math.cos(3 * math.pi / 4)) / 2)


def test_a_run_of_no_steps_is_a_clear_error(tmp_path, data_dir):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=f"--max_tokens 100 is less than one step of {TOKENS_PER_STEP} tokens"):
        train_here(out, data_dir, max_steps=None, max_tokens=100)
    with pytest.raises(ValueError, match=f"--max_tokens {TOKENS_PER_STEP - 1} is less than one step"):
        train_here(out, data_dir, max_steps=1000, max_tokens=TOKENS_PER_STEP - 1)  # the first limit reached
    for name in ("max_steps", "max_tokens", "max_time"):
        with pytest.raises(ValueError, match=f"--{name} must be positive, got 0"):
            train_here(out, data_dir, **{name: 0})
    assert not (out / "final").exists()


def test_max_time_stops_early_with_a_checkpoint_and_no_final_weights(tmp_path, data_dir, capsys):
    """A run stopped by --max_time exports nothing to final/ (a finetune starting from there would take unfinished
    weights); resumed to its end, it does."""
    out = tmp_path / "out"
    train_here(out, data_dir, max_steps=4, max_time=1e-6, val_data_dir=None, save_interval=1000)  # after 1 step
    (checkpoint,) = out.glob("step-*")
    assert checkpoint.name == "step-00000001" and max(losses(out)) == 1  # the last step is logged and saved
    assert not (out / "final").exists()
    printed = capsys.readouterr().out
    assert f"Stopped at step 1 of 4 (--max_time 1e-06 s): the run is in {checkpoint}" in printed
    assert "--resume auto" in printed

    train_here(out, data_dir, max_steps=4, val_data_dir=None, save_interval=1000, resume="auto")
    assert sorted(losses(out)) == [1, 2, 3, 4]
    trained = torch.load(out / "step-00000004", weights_only=True)["model"]
    weights = final_weights(out)
    assert weights.keys() == trained.keys()
    assert all(torch.equal(weights[name], trained[name]) for name in trained)


def test_tokenizer_files_go_with_the_final_weights_and_must_fit_the_model(tmp_path, data_dir):
    tokenizer_dir = word_level_tokenizer(tmp_path / "tokenizer", vocab_size=200)
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    (tokenizer_dir / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    out = tmp_path / "out"
    train_here(out, data_dir, max_steps=1, val_data_dir=None, tokenizer_dir=tokenizer_dir)
    copied = {name for name in TOKENIZER_FILES if (out / "final" / name).is_file()}
    assert copied == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    for name in copied:
        assert (out / "final" / name).read_bytes() == (tokenizer_dir / name).read_bytes()
    assert Tokenizer(out / "final").encode("w5 w7", bos=True) == [1, 5, 7]

    too_large = word_level_tokenizer(tmp_path / "too_large", vocab_size=300)  # the micro model has 256
    message = f"{too_large / 'tokenizer.json'} has 300 tokens, more than the vocab_size=256 of the 'micro' config"
    with pytest.raises(ValueError, match=re.escape(message)):
        train_here(tmp_path / "other", data_dir, tokenizer_dir=too_large)


@pytest.mark.parametrize("epochs", [1, 2])
def test_epochs_is_derived_from_the_data(tmp_path, epochs):
    data = tmp_path / "data"
    write_shards(data, "train_code", n_blocks=37)  # 4 global batches of 8 and 5 blocks left over
    out = tmp_path / "out"
    train_here(out, data, val_data_dir=None, train_data_mix="train_code", max_steps=None, epochs=epochs,
               save_interval=100)
    assert max(losses(out)) == epochs * (37 // 8)
    with pytest.raises(ValueError, match="--epochs needs a single training source"):
        train_here(tmp_path / "two", tmp_path / "data", val_data_dir=None, train_data_mix="train_code,train_code",
                   max_steps=None, epochs=1)


def test_compile_trains_like_eager(tmp_path, data_dir, monkeypatch):
    """--compile goes through torch.compile (TorchDynamo + AOTAutograd; the aot_eager backend skips only the C++
    code generation, which takes a minute on 2 cores)."""
    real_compile, compiled = torch.compile, []

    def compile_aot_eager(model, **kwargs):
        compiled.append(model)
        return real_compile(model, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    train_here(tmp_path / "compiled", data_dir, max_steps=2, compile=True, val_data_dir=None)
    assert len(compiled) >= 1
    train_here(tmp_path / "eager", data_dir, max_steps=2, val_data_dir=None)
    got, expected = losses(tmp_path / "compiled"), losses(tmp_path / "eager")
    assert got.keys() == expected.keys() == {1, 2}
    assert all(got[step] == pytest.approx(expected[step], abs=1e-5) for step in got)


# ---- two processes: DDP and FSDP2 on gloo ---------------------------------------------------------------------

# the run of `distributed_runs` (tests/conftest.py), with 1 process and with 2 under DDP and FSDP
DISTRIBUTED = dict(train_data_mix="train_a", max_steps=4, save_interval=2, eval_interval=4)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(distributed_runs, strategy):
    """Rank r reads blocks r, r + 2, ... of the global order, so 2 x 2 x 2 sequences per step are the very
    sequences 1 x 2 x 4 reads: the same losses and weights up to the order of float sums."""
    single, multi = metrics(distributed_runs["single"]), metrics(distributed_runs[strategy])
    assert sorted(losses(distributed_runs[strategy])) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert multi[step]["loss"] == pytest.approx(single[step]["loss"], abs=1e-5)
        assert multi[step]["tokens"] == single[step]["tokens"] == step * TOKENS_PER_STEP
    # the whole validation set on both sides: the same initial weights, then the same trained ones
    for step in (0, 4):
        assert multi[step]["val_loss"] == pytest.approx(single[step]["val_loss"], abs=1e-5)
    weights, reference = final_weights(distributed_runs[strategy]), final_weights(distributed_runs["single"])
    assert weights.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(weights[name], reference[name], rtol=1e-4, atol=1e-5)


def test_fsdp_checkpoint_is_sharded_and_resumes_exactly(distributed_runs, tmp_path, data_dir):
    fsdp = distributed_runs["fsdp"]
    checkpoint = fsdp / "step-00000002"
    assert checkpoint.is_dir() and len(list(checkpoint.glob("*.distcp"))) == 2  # one shard per rank
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(checkpoint, resumed / checkpoint.name)
    run_script("pretrain/tinyllama.py",
               run_args(resumed, data_dir, **DISTRIBUTED, devices=2, strategy="fsdp", resume="auto"))
    expected = losses(fsdp)
    assert losses(resumed) == {3: expected[3], 4: expected[4]}
    weights, reference = final_weights(resumed), final_weights(fsdp)
    assert all(torch.equal(weights[name], reference[name]) for name in reference)

    with pytest.raises(ValueError, match="is a sharded checkpoint written by FSDP"):
        train_here(tmp_path / "one", data_dir, **DISTRIBUTED, strategy="fsdp", resume=checkpoint)
    with pytest.raises(ValueError, match="written by 2 processes"):  # each rank's data position is in it
        train_here(tmp_path / "one", data_dir, **DISTRIBUTED, resume=distributed_runs["ddp"] / "step-00000002")


def test_hybrid_sharding_over_two_nodes_of_two_processes_matches_one(distributed_runs, tmp_path, data_dir):
    """--fsdp_sharding hybrid: 2 nodes (2 launches on this machine, Fabric's NODE_RANK) x 2 processes, a 2-D mesh
    that shards within each node and replicates across the two: the same losses and weights as one process."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = run_args(tmp_path / "hybrid", data_dir, **DISTRIBUTED, devices=2, num_nodes=2, strategy="fsdp",
                    fsdp_sharding="hybrid")
    nodes = [subprocess.Popen(command_line("pretrain/tinyllama.py", args), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True,
                              env={**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(rank)})
             for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=240)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:  # a hung peer: its launcher's children too
                os.killpg(node.pid, signal.SIGKILL)
    assert all(node.returncode == 0 for node in nodes), outputs[0][-3000:] + outputs[1][-3000:]
    assert len(list((tmp_path / "hybrid" / "step-00000002").glob("*.distcp"))) == 4  # one shard file per rank
    single, hybrid = metrics(distributed_runs["single"]), metrics(tmp_path / "hybrid")
    for step, name in [(step, "loss") for step in (1, 2, 3, 4)] + [(0, "val_loss"), (4, "val_loss")]:
        assert hybrid[step][name] == pytest.approx(single[step][name], abs=1e-5)
    weights, reference = final_weights(tmp_path / "hybrid"), final_weights(distributed_runs["single"])
    for name in reference:
        torch.testing.assert_close(weights[name], reference[name], rtol=1e-4, atol=1e-5)


def test_bf16_precisions_train_close_to_fp32_and_fsdp_matches_one_process(tmp_path, data_dir):
    args = dict(train_data_mix="train_a", max_steps=2, val_data_dir=None, save_interval=2)
    with launched(("pretrain/tinyllama.py", run_args(tmp_path / "fsdp", data_dir, precision="bf16-mixed", devices=2,
                                                     strategy="fsdp", **args))) as (fsdp_run,):
        train_here(tmp_path / "fp32", data_dir, **args)
        reference = losses(tmp_path / "fp32")
        for precision in ("bf16-mixed", "bf16-true"):
            train_here(tmp_path / precision, data_dir, precision=precision, **args)
            got = losses(tmp_path / precision)
            assert got != reference  # bf16 really was used
            assert all(got[step] == pytest.approx(reference[step], abs=0.05) for step in (1, 2))
        finish(fsdp_run)
    single, fsdp = losses(tmp_path / "bf16-mixed"), losses(tmp_path / "fsdp")
    assert all(fsdp[step] == pytest.approx(single[step], abs=2e-3) for step in (1, 2))


# ---- the recipe scripts ---------------------------------------------------------------------------------------


def test_code_finetune_starts_from_the_weights_and_runs_one_epoch(tmp_path, data_dir):
    """The recipe through its command line, in this process (its documented command runs in
    tests/test_docs_commands.py the same way; a launch of its own would add only the imports)."""
    pretrained = tmp_path / "pretrained"
    train_here(pretrained, data_dir, max_steps=3, eval_interval=3)
    data = tmp_path / "code"
    write_shards(data, "train_starcoder", n_blocks=29, seed=6)  # 3 global batches of 8, 5 blocks left out
    out = tmp_path / "out"
    run_in_process(command_line("finetune/amd_llama_135m_code.py", dict(
        model_name="micro", initial_checkpoint_dir=pretrained / "final", tokenizer_dir=None, out_dir=out,
        train_data_dir=data, val_data_dir=data_dir, eval_iters=8, accelerator="cpu", devices=1,
        precision="32-true", seq_len=SEQ_LEN, global_batch_size=8, micro_batch_size=2, log_interval=1))[1:])
    logged = metrics(out)
    # the pretrained weights: the finetune's first validation is the pretraining's last (same data, same batches)
    assert logged[0]["val_loss"] == pytest.approx(metrics(pretrained)[3]["val_loss"], abs=1e-6)
    assert max(losses(out)) == 29 // 8  # one epoch
    assert logged[1]["learning_rate"] == pytest.approx(3e-4 / 2000)  # a fresh schedule from step 0
    hparams = json.loads((out / "hyperparameters.json").read_text())
    assert (hparams["learning_rate"], hparams["min_lr"], hparams["epochs"]) == (3e-4, 3e-5, 1)
    assert hparams["train_data_mix"] == "train_starcoder"

    with pytest.raises(ValueError, match="is a 'micro' model, but --model_name is 'demo'"):
        train_here(tmp_path / "wrong", data_dir, model_name="demo", initial_checkpoint_dir=pretrained / "final")


def test_initial_checkpoint_of_an_unnamed_config_trains_without_model_name(tmp_path, data_dir):
    """An inherited 3-layer model matches no named config: its model_config.json alone says what to build, and the
    run starts from its very weights (step 0's validation loss is theirs)."""
    config = replace(Config.from_name("micro"), n_layer=3, name="micro-inherit-3")
    torch.manual_seed(5)
    initial = GPT(config)
    save_model_dir(initial, config, None, tmp_path / "inherited")
    out = tmp_path / "out"
    train_here(out, data_dir, model_name=None, initial_checkpoint_dir=tmp_path / "inherited", max_steps=1)
    assert Config.from_file(out / "final") == config
    files = sorted(str(path) for path in data_dir.glob("validation*"))
    blocks = torch.stack(list(PackedDataset(files, n_chunks=8, block_size=SEQ_LEN + 1, shuffle=False)))  # 16, all
    with torch.no_grad():
        logits = initial(blocks[:, :-1])
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), blocks[:, 1:].flatten()).item()
    assert metrics(out)[0]["val_loss"] == pytest.approx(expected, rel=1e-5)


def test_a_converted_model_is_named_by_its_directory_and_keeps_its_tokenizer(tmp_path, data_dir, capsys):
    """No named config matches (an empty name): the logs name its directory; its own tokenizer goes with the final
    weights although --tokenizer_dir names another (the recipe's default)."""
    config = replace(Config.from_name("micro"), n_layer=1, name="")
    save_model_dir(GPT(config), config, word_level_tokenizer(tmp_path / "tokenizer", 256), tmp_path / "SmolLM-mini")
    out = tmp_path / "out"
    train_here(out, data_dir, model_name=None, initial_checkpoint_dir=tmp_path / "SmolLM-mini", max_steps=1,
               tokenizer_dir=tmp_path / "checkpoints" / "TinyLlama-1.1B")
    printed = capsys.readouterr().out
    assert "SmolLM-mini: " in printed and "the tokenizer of --initial_checkpoint_dir" in printed
    assert (out / "final" / "tokenizer.json").read_text() == (tmp_path / "tokenizer" / "tokenizer.json").read_text()


def test_demo_command_learns_end_to_end(tmp_path, capsys):
    """`python pretrain/demo.py` as the README runs it, with fewer steps: it builds the corpus and the
    tokenizer from the standard library and trains; the validation loss falls (6 steps, still in the warmup, take it
    from about ln(4096) = 8.3, a random model's, to about 7.5), and the final weights load in generate/base.py (run
    in this process: tests/test_generate.py runs it as a command)."""
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, *documented("python pretrain/demo.py", add={
            "--data_dir": tmp_path / "demo", "--out_dir": out, "--max_steps": 6, "--eval_interval": 6,
            "--eval_iters": 2})],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout
    initial, final_loss = re.search(r"validation loss: initial (\d+\.\d+), final (\d+\.\d+)", output).groups()
    logged = metrics(out)
    assert (initial, final_loss) == (f"{logged[0]['val_loss']:.4f}", f"{logged[6]['val_loss']:.4f}")
    assert float(final_loss) < float(initial) - 0.5  # on the same validation batches
    assert "Sample from" in output
    final = out / "final"
    assert {"lit_model.pth", "model_config.json", "tokenizer.model"} <= {p.name for p in final.iterdir()}
    run_in_process(["generate/base.py", "--checkpoint_dir", str(final), "--max_new_tokens", "5", "--prompt", "def"])
    assert capsys.readouterr().out.startswith("def")


def test_demo_leaves_the_corpus_check_to_prepare_demo(tmp_path, monkeypatch):
    """prepare_demo decides whether data_dir holds a complete corpus of the right settings, summary.json or not."""
    import pretrain.demo

    class Called(Exception):
        pass

    def prepare_demo(destination_path):
        raise Called(destination_path)

    monkeypatch.setattr(pretrain.demo, "prepare_demo", prepare_demo)
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(Called):
        demo(data_dir=tmp_path, out_dir=tmp_path / "out")


def test_help_shows_the_demo_and_the_demo_has_its_own(capsys):
    helps = {}
    for script in ("pretrain/tinyllama.py", "pretrain/demo.py"):
        run_in_process([script, "--help"])
        helps[script] = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert "python pretrain/demo.py" in helps["pretrain/tinyllama.py"]
    assert "--global_batch_size" in helps["pretrain/tinyllama.py"]
    demo_flags = set(re.findall(r"--\w+", helps["pretrain/demo.py"].split("options:")[1]))
    assert demo_flags == {"--help", "--data_dir", "--out_dir", "--max_steps", "--eval_interval", "--eval_iters"}


# ---- fitting smaller GPUs and longer sequences ----------------------------------------------------------------


@pytest.fixture
def one_process_group(monkeypatch):
    """For FSDP2 over one process in this process: Fabric's rendezvous on a free local port, and afterwards the
    process group it leaves is destroyed and the variables it set are restored."""
    import socket

    import torch.distributed as dist

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    saved = dict(os.environ)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def test_checkpointing_and_cpu_offload_train_as_plain_training_and_resume_exactly(tmp_path, one_process_group):
    """The documented command with stand-ins, on one CPU process: FSDP2 over one process (as on one GPU), each Block
    checkpointed and the state offloaded. Its losses and gradient norms equal a plain run's; a run resumed from its
    step-2 checkpoint equals it bit for bit; the offload policy is applied without pinning (a CPU has no pinned
    memory), and grad_op and hybrid (a 2-D mesh) sharding are applied as asked."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy

    from training import MemoryOptions, checkpoint_blocks, shard_blocks

    data = tmp_path / "data"
    for number, prefix in enumerate(("train_slimpajama", "train_starcoder", "validation")):
        write_shards(data, prefix, n_blocks=16, seed=number)
    stand_in = {"--model_name": "micro", "--train_data_dir": data, "--val_data_dir": data, "--tokenizer_dir":
                word_level_tokenizer(tmp_path / "tokenizer", 256), "--accelerator": "cpu", "--devices": 1,
                "--precision": "32-true", "--global_batch_size": 8, "--micro_batch_size": 2, "--max_steps": 4,
                "--save_interval": 2, "--eval_interval": 4, "--eval_iters": 2, "--seq_len": SEQ_LEN}
    run_in_process(documented("python pretrain/tinyllama.py --activation_checkpointing --fsdp_cpu_offload",
                              add={**stand_in, "--out_dir": tmp_path / "saving"}))
    args = {flag[2:]: value for flag, value in stand_in.items()}
    setup(**args, out_dir=tmp_path / "plain")
    saving, plain = metrics(tmp_path / "saving"), metrics(tmp_path / "plain")
    for step, name in ((4, "loss"), (4, "grad_norm"), (0, "val_loss"), (4, "val_loss")):  # (logged at the end)
        assert saving[step][name] == pytest.approx(plain[step][name], rel=1e-6)
    assert (tmp_path / "saving" / "step-00000002" / ".metadata").is_file()  # sharded: FSDP2 did run

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "saving" / "step-00000002", resumed / "step-00000002")
    setup(**args, out_dir=resumed, activation_checkpointing=True, fsdp_cpu_offload=True, resume="auto")
    assert {name: metrics(resumed)[4][name] for name in ("grad_norm", "val_loss")} == {
        name: saving[4][name] for name in ("grad_norm", "val_loss")}
    weights, reference = final_weights(resumed), final_weights(tmp_path / "saving")
    assert weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in reference)

    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    for memory in (MemoryOptions(True, True, "grad_op"), MemoryOptions(fsdp_sharding="hybrid")):
        model = GPT(Config.from_name("micro"))
        if memory.activation_checkpointing:
            checkpoint_blocks(model)
        group = shard_blocks(model, mesh, memory)._get_fsdp_state()._fsdp_param_group  # FSDP2's own record
        block_group = model.transformer.h[0]._get_fsdp_state()._fsdp_param_group
        for applied in (group, block_group):
            assert (applied.offload_policy == CPUOffloadPolicy(pin_memory=False)) == memory.fsdp_cpu_offload
            assert (applied.post_forward_mesh_info is None) == (memory.fsdp_sharding == "grad_op")  # not resharded
            assert applied.mesh_info.mesh.mesh_dim_names == (("replicate", "shard") if memory.fsdp_sharding ==
                                                             "hybrid" else ("data_parallel",))


def test_tinyllama_code_recipe_continues_a_checkpoint_with_tinyllamas_values(tmp_path):
    from pretrain.tinyllama_code import RECIPE

    config = replace(Config.from_name("micro"), name="micro-start")
    save_model_dir(GPT(config), config, word_level_tokenizer(tmp_path / "tokenizer", 256), tmp_path / "initial")
    write_shards(tmp_path / "data", "train_starcoder", n_blocks=16, seed=6)
    out = tmp_path / "out"
    run_in_process(documented("python pretrain/tinyllama_code.py", add={
        "--initial_checkpoint_dir": tmp_path / "initial", "--train_data_dir": tmp_path / "data", "--out_dir": out,
        "--accelerator": "cpu", "--devices": 1, "--precision": "32-true", "--global_batch_size": 8,
        "--micro_batch_size": 2, "--max_steps": 2, "--seq_len": SEQ_LEN}))
    hparams = json.loads((out / "hyperparameters.json").read_text())
    tinyllama = dict(learning_rate=2e-4, min_lr=2e-5, warmup_steps=0, save_interval=2000, weight_decay=0.1, beta1=0.9,
                     beta2=0.95, grad_clip=1.0, train_data_mix="train_starcoder")  # its tinyllama_code.py
    assert {name: hparams[name] for name in tinyllama} == tinyllama
    assert (RECIPE["global_batch_size"], RECIPE["max_steps"], RECIPE["seq_len"]) == (360, 10_000, 2048)
    assert all(360 % (RECIPE["micro_batch_size"] * devices) == 0 for devices in (1, 2, 3, 4, 6, 8))
    assert metrics(out)[2]["learning_rate"] == pytest.approx(2e-5 + 0.5 * (2e-4 - 2e-5))  # cosine, no warmup
    assert Config.from_file(out / "final") == config


def test_8k_recipe_trains_beyond_the_context_at_the_condensed_angles(tmp_path):
    """The documented 8k commands on stand-ins: the StarCoder preparer with its --chunk_size, then the recipe from a
    64-token model, which trains at 4 x 64 = 256 tokens with the positions divided by 4, against angles by hand."""
    from prepare_data.train_tokenizer import train_tokenizer
    from test_prepare_data import sentences, write_parquet

    assert 2097408 == 256 * (8192 + 1)  # the documented chunk size: 256 whole blocks of 8,193 tokens a shard
    train_tokenizer(sentences(500, seed=0), tmp_path / "tokenizer", vocab_size=320)
    write_parquet(tmp_path / "starcoderdata" / "python" / "train-0.parquet", {"content": sentences(80, seed=1)})
    run_in_process(documented(
        "python prepare_data/prepare_starcoder.py --source_path data/starcoderdata --split train --chunk_size 2097408 "
        "--tokenizer_path checkpoints/TinyLlama-1.1B --destination_path data/starcoder_8k",
        replace={"--source_path": tmp_path / "starcoderdata", "--tokenizer_path": tmp_path / "tokenizer",
                 "--destination_path": tmp_path / "starcoder_8k"}))
    config = replace(Config.from_name("micro"), vocab_size=320, padded_vocab_size=None, name="micro-320")
    save_model_dir(GPT(config), config, tmp_path / "tokenizer", tmp_path / "initial")
    out = tmp_path / "out"
    run_in_process(documented("python pretrain/tinyllama_code_8k.py", add={
        "--initial_checkpoint_dir": tmp_path / "initial", "--train_data_dir": tmp_path / "starcoder_8k",
        "--out_dir": out, "--accelerator": "cpu", "--devices": 1, "--precision": "32-true",
        "--global_batch_size": 2, "--micro_batch_size": 1, "--max_steps": 2, "--seq_len": 4 * 64}))
    final = Config.from_file(out / "final")
    assert (final.name, final.block_size, final.rope_condense_ratio) == ("micro-320-rope4", 256, 4)
    assert metrics(out)[2]["tokens"] == 2 * 2 * 256 and all(math.isfinite(loss) for loss in losses(out).values())
    head_size = config.n_embd // config.n_head
    frequencies = 1.0 / 10000 ** (torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)
    angles = torch.outer(torch.arange(256, dtype=torch.float64) / 4, frequencies).repeat(1, 2)
    model = GPT(final)
    # float32 angles of up to 64 radians: a few 1e-6 off the float64 ones
    torch.testing.assert_close(model.cos.double(), angles.cos(), rtol=0, atol=1e-5)
    torch.testing.assert_close(model.sin.double(), angles.sin(), rtol=0, atol=1e-5)
    original = GPT(config)  # position 4k of the extended model at the original's angles of position k
    assert torch.equal(model.cos[::4], original.cos) and torch.equal(model.sin[::4], original.sin)
