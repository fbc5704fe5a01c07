"""finetune/demo.py as a user runs it, on tiny settings: a stand-in for the pretraining demo's final model (a tiny
random model with a sentencepiece tokenizer trained here), data from a few standard library files."""

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from chat_template import BUILTIN_TEMPLATES
from checkpoint import load_model, save_model_dir
from model import GPT, Config
from tests.test_tokenizer import train_sentencepiece

ROOT = Path(__file__).resolve().parent.parent


def test_sft_demo_finetunes_reports_validation_and_answers(tmp_path):
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer_dir.mkdir()
    train_sentencepiece(tokenizer_dir)
    config = Config(name="demo-standin", block_size=256, vocab_size=600, n_layer=1, n_head=2, n_embd=32,
                    intermediate_size=64)
    torch.manual_seed(0)
    save_model_dir(GPT(config), config, tokenizer_dir, tmp_path / "pretrained")
    command = [sys.executable, str(ROOT / "finetune/demo.py"), "--checkpoint_dir", str(tmp_path / "pretrained"),
               "--data_dir", str(tmp_path / "sft_data"), "--out_dir", str(tmp_path / "out"), "--max_steps", "4",
               "--eval_interval", "2", "--eval_iters", "2", "--max_files", "30", "--max_new_tokens", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = re.search(r"validation loss: initial ([\d.]+), final ([\d.]+)", result.stdout)
    initial, final = float(losses[1]), float(losses[2])
    assert final < initial
    assert "A question the model was not trained on" in result.stdout
    assert (tmp_path / "out" / "final" / "chat_template.jinja").read_text() == BUILTIN_TEMPLATES["guanaco"]
    load_model(tmp_path / "out" / "final")
