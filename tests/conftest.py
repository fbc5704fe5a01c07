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
