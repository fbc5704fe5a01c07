import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict

import pytest
import torch

# Scripts import the top-level modules (model.py, tokenizer.py, ...) from the repository root.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Without a GPU, Triton kernels run in Triton's interpreter (tests/test_quantized_kernels.py, where Triton is
# installed). Triton reads the switch when it decorates its functions, its own library's too, and torch._dynamo
# imports Triton: so it is set here, before any test module is imported. Nothing else runs Triton kernels on a CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def hf_home(tmp_path, monkeypatch):
    """Hugging Face libraries offline, with a cache of their own: nothing is downloaded or shared between tests."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tests' models are tiny: a second OpenMP thread only waits on the first, and on a loaded 2-core machine
    that wait dominates (measured: 4 ms vs 200-400 ms per forward of a 2-layer model while other jobs ran)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class TrainedCheckpoint:
    checkpoint_dir: Path  # the final weights: lit_model.pth, model_config.json, tokenizer.model
    data_dir: Path  # the corpus it was trained on: tokenizer.model, train/ and validation/ shards with manifests


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> TrainedCheckpoint:
    """One tiny trained checkpoint that the tests of later features share instead of training their own: model.py's
    `demo` config (4 layers, 4096 tokens, block size 256) trained by pretrain/tinyllama.py's `setup` for 40 steps of
    2 sequences on the demo corpus of the standard library's first 40 files of each source, with its sentencepiece
    tokenizer (prepare_data/prepare_demo.py). About 10 s on one core; the validation loss falls from ln(4096) = 8.3
    to about 6.5."""
    from prepare_data.prepare_demo import prepare_demo
    from pretrain.demo import DEMO
    from pretrain.tinyllama import setup

    root = tmp_path_factory.mktemp("trained")
    data_dir = prepare_demo(root / "data", max_files=40, validation_fraction=0.2, num_processes=1, quiet=True)
    settings = {**DEMO, "global_batch_size": 2, "micro_batch_size": 2, "log_interval": 40, "save_interval": 1000}
    setup(**settings, train_data_dir=data_dir / "train", val_data_dir=data_dir / "validation", tokenizer_dir=data_dir,
          out_dir=root / "out", max_steps=40, eval_interval=40, eval_iters=2)
    return TrainedCheckpoint(root / "out" / "final", data_dir)


@pytest.fixture(scope="session")
def pretrain_shards(tmp_path_factory) -> Path:
    """tests/test_pretrain.py's shards (its `data_dir`): two learnable training sources and a validation one, of
    whole blocks of its SEQ_LEN + 1 tokens. A session's, as the two-process runs on them are."""
    from test_pretrain import write_shards

    directory = tmp_path_factory.mktemp("data")
    write_shards(directory, "train_a", n_blocks=64, seed=1)
    write_shards(directory, "train_b", n_blocks=40, seed=2)
    write_shards(directory, "validation_a", n_blocks=16, seed=3)
    return directory


@pytest.fixture(scope="session")
def distributed_runs(tmp_path_factory, pretrain_shards) -> Dict[str, Path]:
    """name -> out_dir of the same run of pretrain/tinyllama.py on `pretrain_shards` (test_pretrain.DISTRIBUTED: one
    source, global batch 8, 4 steps, checkpoints at steps 2 and 4): "single" (1 process, in this process), "ddp" and
    "fsdp" (2 processes each, launched by the script itself: --devices 2). Shared by the tests of test_pretrain.py
    that compare them and by test_training_state.py's, which need a real sharded (FSDP) checkpoint. The two launches
    and the single run go side by side: a launch spends most of its seconds importing, on one core."""
    from test_pretrain import DISTRIBUTED, finish, launched, run_args, train_here

    root = tmp_path_factory.mktemp("distributed")
    launches = {"ddp": {"devices": 2, "strategy": "ddp"}, "fsdp": {"devices": 2, "strategy": "fsdp"}}
    with launched(*(("pretrain/tinyllama.py", run_args(root / name, pretrain_shards, **DISTRIBUTED, **settings))
                    for name, settings in launches.items())) as processes:
        train_here(root / "single", pretrain_shards, **DISTRIBUTED, devices=1)
        for process in processes:
            finish(process)
    return {name: root / name for name in ("single", *launches)}
