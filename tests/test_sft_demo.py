"""finetune/demo.py as a user runs it, on tiny settings: the session's tiny trained checkpoint stands in for the
pretraining demo's final model, data from a few standard library files."""

import os
import re
import subprocess
import sys
from pathlib import Path

from chat_template import BUILTIN_TEMPLATES
from checkpoint import load_model
from tests.documented import documented

ROOT = Path(__file__).resolve().parent.parent


def test_sft_demo_finetunes_reports_validation_and_answers(trained, tmp_path):
    command = [sys.executable, *documented("python finetune/demo.py", add={
        "--checkpoint_dir": trained.checkpoint_dir, "--data_dir": tmp_path / "sft_data", "--out_dir": tmp_path / "out",
        "--max_steps": 4, "--eval_interval": 2, "--eval_iters": 2, "--max_files": 30, "--max_new_tokens": 8})]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = re.search(r"validation loss: initial ([\d.]+), final ([\d.]+)", result.stdout)
    initial, final = float(losses[1]), float(losses[2])
    assert final < initial
    assert "A question the model was not trained on" in result.stdout
    assert (tmp_path / "out" / "final" / "chat_template.jinja").read_text() == BUILTIN_TEMPLATES["guanaco"]
    load_model(tmp_path / "out" / "final")
