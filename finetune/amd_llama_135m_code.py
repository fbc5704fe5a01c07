"""Finetune AMD-Llama-135m on code (AMD-Llama-135m-code): the loop of pretrain/tinyllama.py, continued from
pretrained weights on the Python part of StarCoder for one epoch.

    python finetune/amd_llama_135m_code.py

It starts from the weights of `initial_checkpoint_dir` (by default the final weights of pretrain/amd_llama_135m.py)
with a fresh optimizer and schedule. The data:

    python prepare_data/prepare_starcoder.py --languages python --split train \
        --tokenizer_path checkpoints/AMD-Llama-135m --destination_path data/starcoder_python

One epoch is every block of the training shards once: (blocks // 320) steps; the lr decays over exactly those.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pretrain.tinyllama import recipe
from utils import cli

RECIPE = dict(
    model_name="AMD-Llama-135m",
    initial_checkpoint_dir=Path("out/amd_llama_135m/final"),
    tokenizer_dir=Path("out/amd_llama_135m/final"),
    out_dir=Path("out/amd_llama_135m_code"),
    train_data_dir=Path("data/starcoder_python"),
    val_data_dir=None,
    train_data_mix="train_starcoder",
    seq_len=2048,
    global_batch_size=320,
    micro_batch_size=8,
    max_steps=None,
    epochs=1,
    learning_rate=3e-4,
    min_lr=3e-5,
    warmup_steps=2000,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.95,
    eps=1e-8,
    grad_clip=1.0,
)

if __name__ == "__main__":
    cli(recipe(__doc__, **RECIPE))
