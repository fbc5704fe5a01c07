"""shard_packing.py across machines and interruptions, against independent references: every node count packs the
documents sentencepiece encodes from the inputs (nodes run as subprocesses of one machine), a resumed run the bytes
of an uninterrupted one, and the free-space estimate the bytes a run really writes. Shards are decoded by
test_prepare_data's hand-written LITPKDS reader."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import shard_packing
from packed_dataset import training_batches, validation_batches
from prepare_data import prepare_text
from shard_packing import Job, node_files, prepare, resolve_nodes
from tests.documented import documented
import test_prepare_data
from test_prepare_data import read_prefix, record, sentences, split_documents, write_zst
from text_readers import read_text_documents
from utils import UserError

ROOT = Path(__file__).resolve().parent.parent
ENV = {key: value for key, value in os.environ.items() if not key.startswith("DATA_OPTIMIZER_")}


tokenizer_dir, sp = test_prepare_data.tokenizer_dir, test_prepare_data.sp  # its fixtures: a 320-piece tokenizer


@pytest.fixture(scope="module")
def slimpajama(tmp_path_factory):
    """7 SlimPajama files of different sizes; returns (source_path, every document's text)."""
    source, texts = tmp_path_factory.mktemp("slimpajama"), []
    for number, count in enumerate((30, 5, 12, 20, 8, 16, 3)):
        documents = sentences(count, seed=100 + number)
        texts += documents
        write_zst(source / "train" / f"chunk{number % 2 + 1}" / f"example_train_{number}.jsonl.zst",
                  [record(text, "RedPajamaC4") for text in documents])
    return source, texts


def documents_of(directory: Path, split: str = "train") -> Counter:
    """Every document of the shards of `directory`, wherever a node or process put it."""
    found = Counter()
    for stream in {shard.name.rsplit("_", 1)[0] for shard in directory.glob(f"{split}_*.bin")}:
        found.update(split_documents(read_prefix(directory, stream)))
    return found


def test_node_shares_are_balanced_by_size_deterministic_and_cover_every_file(tmp_path):
    files = []
    for i, size in enumerate([900, 10, 500, 480, 30, 30, 250, 5, 700, 60]):
        files.append(tmp_path / f"f{i}.jsonl")
        files[-1].write_bytes(b"x" * size)
    sizes = {path: path.stat().st_size for path in files}
    for num_nodes in (1, 2, 3, 4):
        shares = [node_files(files, num_nodes, rank) for rank in range(num_nodes)]
        assert sorted(path for share in shares for path in share) == files  # each file on exactly one node
        assert all(share == sorted(share) for share in shares)
        totals = [sum(sizes[path] for path in share) for share in shares]
        assert max(totals) - min(totals) <= max(sizes.values())
        shuffled = random.Random(num_nodes).sample(files, len(files))  # another listing order: the same shares
        assert shares == [sorted(node_files(shuffled, num_nodes, rank)) for rank in range(num_nodes)]
    # by hand: 900 700 500 480 250 60 30 30 10 5 go to nodes 0 1 1 0 1 0 0 1 0 0 (the lighter; 0 on a tie)
    assert [sum(sizes[p] for p in node_files(files, 2, rank)) for rank in (0, 1)] == [1485, 1480]
    with pytest.raises(UserError, match=re.escape("--num_nodes 11: 10 input files leave node 10 none")):
        node_files(files, 11, 10)


def test_nodes_from_flags_or_litdatas_variables_checked(monkeypatch):
    assert resolve_nodes(None, None) == (1, 0)
    monkeypatch.setenv("DATA_OPTIMIZER_NUM_NODES", "4")
    monkeypatch.setenv("DATA_OPTIMIZER_NODE_RANK", "3")
    assert resolve_nodes(None, None) == (4, 3) and resolve_nodes(2, 1) == (2, 1)
    monkeypatch.setenv("DATA_OPTIMIZER_NODE_RANK", "4")
    with pytest.raises(UserError, match=re.escape("--node_rank (from DATA_OPTIMIZER_NODE_RANK) must be in [0, 3] for "
                                                  "4 nodes, got 4")):
        resolve_nodes(None, None)
    monkeypatch.setenv("DATA_OPTIMIZER_NUM_NODES", "two")
    with pytest.raises(UserError, match=re.escape("--num_nodes (from DATA_OPTIMIZER_NUM_NODES) must be an integer")):
        resolve_nodes(None, 0)
    with pytest.raises(UserError, match=re.escape("--num_nodes must be at least 1, got 0")):
        resolve_nodes(0, 0)


def documented_node(rank: int, source: Path, tokenizer_dir: Path, out: Path) -> list:
    """docs/cluster.md's command of node `rank` of 2, with the table's substitutions (paths, one process)."""
    paths = {"--source_path": source, "--tokenizer_path": tokenizer_dir, "--destination_path": out}
    if rank == 0:
        return documented("python prepare_data/prepare_slimpajama.py --source_path data/SlimPajama-627B --split train "
                          "--tokenizer_path checkpoints/TinyLlama-1.1B --destination_path data/slim_star_combined "
                          "--num_nodes 2 --node_rank 0 --resume", replace=paths, add={"--num_processes": 1})
    return documented("python prepare_data/prepare_slimpajama.py --source_path data/SlimPajama-627B --split train "
                      "--tokenizer_path checkpoints/TinyLlama-1.1B --destination_path data/slim_star_combined "
                      "--num_nodes 2 --node_rank 1 --resume", replace=paths, add={"--num_processes": 1})


def test_every_node_count_packs_the_same_documents_and_training_needs_every_node(slimpajama, tokenizer_dir, sp,
                                                                                tmp_path):
    """1, 2 and 3 nodes, each node a subprocess (those of one run at once, into one directory): 2 nodes by the
    commands docs/cluster.md shows, 3 by litdata's variables. Then training reads the union, and refuses it
    without a node."""
    source, texts = slimpajama
    runs = {}
    for num_nodes in (1, 2, 3):
        out = tmp_path / f"nodes{num_nodes}"
        commands = []
        for rank in range(num_nodes):
            env = ENV
            if num_nodes == 2:
                argv = documented_node(rank, source, tokenizer_dir, out)
            else:
                argv = ["prepare_data/prepare_slimpajama.py", "--source_path", str(source), "--tokenizer_path",
                        str(tokenizer_dir), "--destination_path", str(out), "--num_processes", "1", "--chunk_size",
                        "64", "--quiet"]
                if num_nodes == 3:
                    env = {**ENV, "DATA_OPTIMIZER_NUM_NODES": "3", "DATA_OPTIMIZER_NODE_RANK": str(rank)}
            commands.append(subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.PIPE, text=True))
        for command in commands:
            assert command.wait(timeout=120) == 0, command.stderr.read()
        runs[num_nodes] = out
    expected = Counter(tuple(sp.encode(text)) for text in texts)
    for num_nodes, out in runs.items():
        assert documents_of(out) == expected, num_nodes
    assert sorted(path.name for path in runs[3].glob("manifest*")) == [
        f"manifest_train_slimpajama_node{rank}.json" for rank in range(3)]
    assert {path.name.split("_")[2] for path in runs[3].glob("*.bin")} == {"node0", "node1", "node2"}
    manifest = json.loads((runs[3] / "manifest_train_slimpajama_node1.json").read_text())
    assert (manifest["run"], manifest["num_nodes"], manifest["node_rank"]) == ("train_slimpajama", 3, 1)

    def read(directory):
        return training_batches(directory, "train_slimpajama", 17, 1, seed=1, num_processes=1, process_rank=0)

    single = sum(d.n_blocks_total for d in read(runs[1]).dataset.datasets)
    assert sum(d.n_blocks_total for d in read(runs[3]).dataset.datasets) >= single - 2 * 3  # (one tail per process)
    node1 = runs[3] / "manifest_train_slimpajama_node1.json"
    node1.write_text(json.dumps({**manifest, "inputs_sha256": "0" * 64}))  # as if node 1 had listed other files
    with pytest.raises(UserError, match="were given different input files"):
        read(runs[3])
    node1.write_text(json.dumps(manifest))
    (runs[3] / "manifest_train_slimpajama_node2.json").unlink()  # node 2 was killed before its manifest
    with pytest.raises(UserError, match=re.escape(f"(python prepare_data/prepare_slimpajama.py --split train "
                                                  f"--destination_path {runs[3]} --node_rank 2 --resume ...)")):
        read(runs[3])
    for shard in runs[3].glob("train_slimpajama_node2_*.bin"):  # node 2 never ran
        shard.unlink()
    with pytest.raises(UserError, match=re.escape(
            f"{runs[3]}: train_slimpajama was prepared on 3 nodes, but node 2 wrote no manifest "
            f"(manifest_train_slimpajama_node2.json): its preparation did not finish. Rerun it there with "
            f"--num_nodes 3 --node_rank 2 --resume")):
        read(runs[3])


def test_a_node_refuses_only_its_own_shards_and_no_other_layout(slimpajama, tokenizer_dir, tmp_path):
    from prepare_data.prepare_slimpajama import main

    source, _ = slimpajama
    args = dict(source_path=source, tokenizer_path=tokenizer_dir, destination_path=tmp_path, chunk_size=64,
                num_processes=1, quiet=True)
    main(**args, num_nodes=2, node_rank=0)
    main(**args, num_nodes=2, node_rank=1)  # node 0 wrote first: no refusal
    with pytest.raises(UserError, match=r"shards and 0 other files from an earlier run .* pass --resume"):
        main(**args, num_nodes=2, node_rank=1)
    with pytest.raises(UserError, match="shards of train_slimpajama from a run on several nodes"):
        main(**args)
    assert main(**args, num_nodes=2, node_rank=1, resume=True).documents["train"] > 0  # complete: nothing to do


def killing_corpus(tmp_path):
    """12 JSON lines files, and a reader module that kills its whole process group (the preparer and its packing
    processes, as a machine that dies) in the middle of the file named by $KILL_AT."""
    source = tmp_path / "corpus"
    source.mkdir()
    for i in range(12):
        (source / f"{i:02d}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences(9, seed=i)))
    (tmp_path / "killer.py").write_text(
        "import os, signal\n"
        "from text_readers import read_text_documents\n\n\n"
        "def read(path, report):\n"
        "    for number, item in enumerate(read_text_documents(path, report)):\n"
        "        if path.name == os.environ['KILL_AT'] and number == 5:\n"
        "            os.killpg(0, signal.SIGKILL)\n"
        "        yield item\n")
    return source


def job(source: Path, tokenizer: Path, out: Path, read=read_text_documents, **settings) -> Job:
    settings = {"validation_fraction": 0.2, "chunk_size": 16, "record_seconds": 0, **settings}
    return Job(read_documents=read, tokenizer_path=tokenizer, destination=out, name="mine", split=None, **settings)


@pytest.mark.parametrize("processes, kill_at", [(1, "04.jsonl"), (2, "07.jsonl")])
def test_a_killed_run_resumes_to_the_bytes_of_an_uninterrupted_run(tmp_path, tokenizer_dir, processes, kill_at):
    """SIGKILL in the middle of a file (1 process: after 4 files; 2 processes: process 1 after 3 of its files,
    process 0 wherever it was), then --resume: the same shards, byte for byte, and the same summary counts."""
    source = killing_corpus(tmp_path)
    files = sorted(source.glob("*.jsonl"))
    tokenizer = tokenizer_dir / "tokenizer.model"
    reference = prepare(job(source, tokenizer, tmp_path / "reference"), files, processes, quiet=True)
    out = tmp_path / "out"
    code = ("from pathlib import Path; from killer import read; from shard_packing import Job, prepare; "
            f"prepare(Job(read_documents=read, tokenizer_path=Path({str(tokenizer)!r}), destination=Path("
            f"{str(out)!r}), name='mine', split=None, validation_fraction=0.2, chunk_size=16, record_seconds=0), "
            f"sorted(Path({str(source)!r}).glob('*.jsonl')), {processes}, quiet=True)")
    killed = subprocess.run([sys.executable, "-c", code], cwd=ROOT, start_new_session=True, capture_output=True,
                            env={**ENV, "KILL_AT": kill_at, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"},
                            timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    journal = json.loads((out / f".journal_mine_{processes - 1}.json").read_text())
    assert journal["files_done"] == (4 if processes == 1 else 3)  # the last file was in flight
    assert not list(out.glob("manifest*"))
    left = {path.name for path in out.glob("*.bin")}
    with pytest.raises(UserError, match="pass --resume to continue that run"):
        prepare(job(source, tokenizer, out), files, processes, quiet=True)
    with pytest.raises(UserError, match=re.escape("written by a run with another --chunk_size (16, now 32)")):
        prepare(job(source, tokenizer, out, resume=True, chunk_size=32), files, processes, quiet=True)

    (out / "..journal_mine_0.json.x1y2z3.tmp").write_text("{")  # a journal write the kill cut short
    resumed = prepare(job(source, tokenizer, out, resume=True), files, processes, quiet=True)
    shards = sorted(path.name for path in (tmp_path / "reference").glob("*.bin"))
    assert sorted(path.name for path in out.glob("*.bin")) == shards
    assert left - set(shards) == set() and len(left) < len(shards)  # some were written before, some after
    assert all((out / name).read_bytes() == (tmp_path / "reference" / name).read_bytes() for name in shards)
    assert resumed.documents == reference.documents and resumed.tokens == reference.tokens
    assert resumed.input_files == len(files) and resumed.resumed_files >= 4
    everything = sorted(path.name for path in (tmp_path / "reference").iterdir())
    assert sorted(path.name for path in out.iterdir()) == everything  # no journal (nor its .tmp), no .open file
    batches = validation_batches(out, 9, 1, num_processes=1, process_rank=0)  # the manifest covers every shard
    assert batches.dataset.n_blocks_total > 0


def test_too_little_free_space_is_refused_before_anything_is_written(tmp_path, tokenizer_dir, monkeypatch):
    """The estimate against what a run really writes: one file (the sample is the whole input), 2-byte tokens."""
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences(200, seed=1)))
    args = dict(source_path=str(tmp_path / "corpus.jsonl"), tokenizer_path=tokenizer_dir, num_processes=1,
                quiet=True, chunk_size=1 << 20)
    report = prepare_text.main(**args, destination_path=tmp_path / "measured")
    written = 2 * sum(report.tokens.values())
    free = shutil.disk_usage(tmp_path)

    def disk_usage(fraction):
        return lambda path: free._replace(free=int(written * fraction))

    monkeypatch.setattr(shard_packing.shutil, "disk_usage", disk_usage(1.15))  # the estimate: written x 1.1
    prepare_text.main(**args, destination_path=tmp_path / "enough")
    monkeypatch.setattr(shard_packing.shutil, "disk_usage", disk_usage(1.05))
    with pytest.raises(UserError, match=rf"--destination_path {tmp_path / 'short'} has 0\.00 GB free, but the shards "
                                        rf"of 1 files need about 0\.00 GB \(0\.00 GB of input x 0\.\d+ tokens per "
                                        rf"byte, measured on {tmp_path / 'corpus.jsonl'}, x 2 bytes per token, "
                                        rf"\+ 10%\)"):
        prepare_text.main(**args, destination_path=tmp_path / "short")
    assert not list((tmp_path / "short").iterdir())


def test_a_preparer_stopped_by_an_error_under_resume_keeps_its_progress(tmp_path, tokenizer_dir):
    """--strict stops at a bad line in the 3rd file; with --resume the first two files' shards stay, and once the
    file is fixed the run continues to the documents an uninterrupted run packs."""
    source = tmp_path / "corpus"
    source.mkdir()
    for i in range(4):
        (source / f"{i}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences(6, seed=i)))
    good = (source / "2.jsonl").read_text()
    (source / "2.jsonl").write_text(good + "not json\n")
    files = sorted(source.glob("*.jsonl"))
    tokenizer = tokenizer_dir / "tokenizer.model"
    with pytest.raises(UserError, match="2.jsonl:7: malformed JSON"):
        prepare(job(source, tokenizer, tmp_path / "out", resume=True, strict=True), files, 1, quiet=True)
    assert json.loads((tmp_path / "out" / ".journal_mine_0.json").read_text())["files_done"] == 2
    (source / "2.jsonl").write_text(good)
    prepare(job(source, tokenizer, tmp_path / "out", resume=True, strict=True), files, 1, quiet=True)
    prepare(job(source, tokenizer, tmp_path / "reference"), files, 1, quiet=True)
    for split in ("train", "validation"):
        assert read_prefix(tmp_path / "out", f"{split}_mine_0") == read_prefix(tmp_path / "reference",
                                                                               f"{split}_mine_0")
