import sys
from pathlib import Path

import pytest

# Scripts import the top-level modules (model.py, tokenizer.py, ...) from the repository root.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def hf_home(tmp_path, monkeypatch):
    """Hugging Face libraries offline, with a cache of their own: nothing is downloaded or shared between tests."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tests' models are tiny: a second OpenMP thread only waits on the first, and on a loaded 2-core machine
    that wait dominates (measured: 4 ms vs 200-400 ms per forward of a 2-layer model while other jobs ran)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
