"""Pretrain AMD-Llama-135m: pretrain/tinyllama.py with AMD's recipe (model card and training code).

    python pretrain/amd_llama_135m.py

SlimPajama without its GitHub and Books sets plus Project Gutenberg, prepared into one directory:

    python prepare_data/prepare_slimpajama.py --exclude_sets RedPajamaGithub,RedPajamaBook --split train \
        --tokenizer_path checkpoints/AMD-Llama-135m --destination_path data/amd_llama_135m
    python prepare_data/prepare_slimpajama.py --exclude_sets RedPajamaGithub,RedPajamaBook --split validation \
        --tokenizer_path checkpoints/AMD-Llama-135m --destination_path data/amd_llama_135m
    python prepare_data/prepare_text.py --source_path data/gutenberg --name gutenberg \
        --tokenizer_path checkpoints/AMD-Llama-135m --destination_path data/amd_llama_135m

The sources are drawn in proportion to their sizes (no weights in train_data_mix); 670B tokens, as AMD.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pretrain.tinyllama import setup
from utils import cli

RECIPE = dict(
    model_name="AMD-Llama-135m",
    out_dir=Path("out/amd_llama_135m"),
    train_data_dir=Path("data/amd_llama_135m"),
    val_data_dir=Path("data/amd_llama_135m"),
    train_data_mix="train_slimpajama,train_gutenberg",
    tokenizer_dir=Path("checkpoints/AMD-Llama-135m"),
    seq_len=2048,
    global_batch_size=1024,
    micro_batch_size=16,
    max_steps=None,
    max_tokens=670_000_000_000,
    learning_rate=6e-4,
    min_lr=6e-5,
    warmup_steps=2000,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.95,
    eps=1e-8,
    grad_clip=1.0,
)

if __name__ == "__main__":
    cli(setup, defaults=RECIPE, description=__doc__)
