"""training_state.py: training checkpoints cannot run code when loaded, saving them stages nothing (issue 8: #1,
#5), and --resume auto picks the highest step.

#1: a sharded (FSDP) checkpoint is a `.metadata` pickle and `.distcp` files whose non-tensor items are pickles too;
torch.distributed.checkpoint unpickles both without restriction. The payloads here create a marker file when
unpickled; each test first shows that torch's own reader runs it, then that ours refuses it naming the file. The
checkpoint is a real one, written by a two-process FSDP run; the loads run in this one process.
#5: an unsharded checkpoint is written by torch.save straight into a temporary file beside step-N, never in $TMPDIR
and never whole in memory.
"""

import io
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from checkpoint import UnsafeCheckpointError, load_shards, read_shard_index
from model import GPT, Config
from test_pretrain import ROOT, losses, train_here
from training import parameter_groups
from training_state import latest_checkpoint


class Payload:
    """Unpickled, it runs `exec`, which creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.fixture
def data_dir(pretrain_shards) -> Path:
    """test_pretrain.py's shards (tests/conftest.py)."""
    return pretrain_shards


@pytest.fixture
def sharded(distributed_runs) -> Path:
    """step-00000002 of two FSDP processes (tests/conftest.py's run, which test_pretrain.py's tests compare and
    resume). The tests change copies of it only."""
    return distributed_runs["fsdp"] / "step-00000002"


def copy_checkpoint(sharded: Path, tmp_path: Path) -> Path:
    checkpoint = tmp_path / "out" / sharded.name
    shutil.copytree(sharded, checkpoint)
    return checkpoint


def optimizer_state() -> dict:
    """What load_shards fills for the optimizer: the state dict of a fresh micro model's AdamW, as training makes it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = GPT(Config.from_name("micro"))
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.1, False))
    return {"optimizer": get_optimizer_state_dict(model, optimizer)}


def test_a_payload_in_the_shard_index_is_refused_by_resume_naming_the_file(sharded, tmp_path, data_dir):
    checkpoint = copy_checkpoint(sharded, tmp_path)
    marker = tmp_path / "marker"
    (checkpoint / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(AttributeError):  # what fabric.load runs on --resume: torch notices only after the exec
        dcp.FileSystemReader(checkpoint).read_metadata()
    assert marker.exists()
    marker.unlink()

    refused = f"{checkpoint / '.metadata'} pickles builtins.exec: expected only the index classes"
    with pytest.raises(UnsafeCheckpointError, match=re.escape(refused)):
        read_shard_index(checkpoint)
    with pytest.raises(ValueError, match=re.escape(f"--resume {checkpoint}: {refused}")):
        train_here(tmp_path / "other", data_dir, resume=checkpoint)
    with pytest.raises(ValueError, match=re.escape(f"--resume auto: no checkpoint in {checkpoint.parent} can be "
                                                   f"resumed: {refused}")):
        train_here(checkpoint.parent, data_dir, resume="auto")
    assert not marker.exists()


def test_a_payload_in_a_shard_byte_item_is_refused_naming_the_file(sharded, tmp_path):
    """The optimizer's learning rate, a pickled float in a .distcp file, replaced by a pickle that runs code."""
    checkpoint = copy_checkpoint(sharded, tmp_path)
    marker = tmp_path / "marker"
    index = read_shard_index(checkpoint)
    key = next(key for key in index.storage_data if key.fqn == "optimizer.param_groups.0.lr")
    info = index.storage_data[key]
    payload = io.BytesIO()
    torch.save(Payload(marker), payload)
    shard = checkpoint / info.relative_path
    info.offset, info.length = shard.stat().st_size, len(payload.getvalue())
    with open(shard, "ab") as f:
        f.write(payload.getvalue())
    with open(checkpoint / ".metadata", "wb") as f:
        pickle.dump(index, f)

    dcp.load(optimizer_state(), checkpoint_id=checkpoint)  # what fabric.load runs for a directory
    assert marker.exists()
    marker.unlink()

    message = f"{shard}: item 'optimizer.param_groups.0.lr' is not loadable with weights_only=True"
    with pytest.raises(UnsafeCheckpointError, match=re.escape(message)):
        load_shards(checkpoint, optimizer_state())
    assert not marker.exists()


def test_the_shards_load_in_one_process_through_the_safe_reader(sharded):
    """The same items as torch's own reader, e.g. the optimizer's param_groups (loaded with weights_only=True)."""
    ours, theirs = optimizer_state(), optimizer_state()
    load_shards(sharded, ours)
    dcp.load(theirs, checkpoint_id=sharded)
    assert ours["optimizer"]["param_groups"] == theirs["optimizer"]["param_groups"]
    assert all(torch.equal(ours["optimizer"]["state"][name]["exp_avg"], theirs["optimizer"]["state"][name]["exp_avg"])
               for name in theirs["optimizer"]["state"])


def test_a_save_stages_nothing_in_tmpdir_and_loads_with_weights_only(tmp_path, data_dir, monkeypatch):
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr(tempfile, "tempdir", None)  # read $TMPDIR again
    made, real_mkstemp = [], tempfile.mkstemp

    def mkstemp(*args, **kwargs):  # a temporary file moved away after the save would leave $TMPDIR empty
        fd, name = real_mkstemp(*args, **kwargs)
        made.append(Path(name))
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    out = tmp_path / "out"
    train_here(out, data_dir, max_steps=2, save_interval=1, val_data_dir=None)
    assert [path for path in made if tmpdir in path.parents] == [] and list(tmpdir.iterdir()) == []
    assert {path.parent for path in made if ".step-" in path.name} == {out}  # beside step-N instead
    checkpoint = torch.load(out / "step-00000002", weights_only=True)
    assert {"model", "optimizer", "step", "train_data", "rng"} <= checkpoint.keys() and checkpoint["step"] == 2
    assert checkpoint["model"].keys() == GPT(Config.from_name("micro")).state_dict().keys()


def test_saving_adds_no_copy_of_the_checkpoint_to_peak_memory(tmp_path):
    """save_atomic (what save_checkpoint writes a file with) of 128 MiB of tensors, in a fresh process: its peak RSS
    grows by far less than the checkpoint (Fabric's save, which serialises into memory first, grew by 128 MiB)."""
    code = (
        "import resource, sys, torch; from checkpoint import save_atomic\n"
        "state = {f'w{i}': torch.ones(2**21) for i in range(16)}\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "save_atomic(state, sys.argv[1])\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)"  # KiB on Linux -> MiB
    )
    grown = subprocess.run([sys.executable, "-c", code, str(tmp_path / "step")], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout
    assert int(grown) < 16, f"peak RSS grew by {grown} MiB during the save of 128 MiB"


def test_a_crash_during_the_write_leaves_no_partial_checkpoint_and_stale_temporaries_go(
        tmp_path, data_dir, monkeypatch):
    """The second checkpoint write dies halfway; a kill -9 left temporaries too. The next run removes them, resumes
    from step-2 and ends as the uninterrupted run."""
    class Killed(Exception):
        pass

    real_save, calls = torch.save, []

    def dies_halfway(obj, path):  # the write of the checkpoint file itself
        calls.append(Path(path))
        if len(calls) < 2:
            return real_save(obj, path)
        Path(path).write_bytes(b"PK\x03\x04 half of a checkpoint")
        raise Killed("killed while writing the checkpoint")

    monkeypatch.setattr(torch, "save", dies_halfway)
    out = tmp_path / "out"
    with pytest.raises(Killed):
        train_here(out, data_dir, max_steps=4, save_interval=2, val_data_dir=None)
    assert calls[1].parent == out and calls[1].name.startswith(".step-00000004.")  # beside it, not in $TMPDIR
    assert sorted(path.name for path in out.glob("*step-*")) == ["step-00000002"]
    monkeypatch.setattr(torch, "save", real_save)

    (out / ".step-00000004.x1y2z3.tmp").write_bytes(b"left by kill -9")  # what no handler could remove
    (out / ".step-00000004.tmp").mkdir()  # an FSDP save's
    train_here(out, data_dir, max_steps=4, save_interval=2, val_data_dir=None, resume="auto")
    assert sorted(path.name for path in out.glob("*step-*")) == ["step-00000002", "step-00000004"]
    straight = tmp_path / "straight"
    train_here(straight, data_dir, max_steps=4, save_interval=2, val_data_dir=None)
    assert losses(out) == losses(straight)  # resumed from step-2 as if nothing had happened


def test_resume_auto_picks_the_highest_step_number(tmp_path):
    for name in ("step-9", "step-10", "step-00000002", ".step-00000011.tmp", "step-3.old", "final"):
        (tmp_path / name).mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "step-10"  # "step-9" sorts last as a string
    assert latest_checkpoint(tmp_path / "missing") is None
