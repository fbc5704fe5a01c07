"""AMD-Llama-135m-code: continued pretraining of AMD-Llama-135m on the Python part of StarCoder for one epoch, with
the loop of pretrain/tinyllama.py (packed blocks, every token a target; not instruction finetuning).

    python finetune/amd_llama_135m_code.py

It starts from the weights of `initial_checkpoint_dir` (by default the final weights of pretrain/amd_llama_135m.py)
with a fresh optimizer and schedule. The data:

    python prepare_data/prepare_starcoder.py --languages python --split train \
        --tokenizer_path checkpoints/AMD-Llama-135m --destination_path data/starcoder_python

One epoch is every block of the training shards once: (blocks // 320) steps; the lr decays over exactly those.
The model's config comes from initial_checkpoint_dir.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pretrain.tinyllama import setup
from utils import cli

RECIPE = dict(
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
    cli(setup, defaults=RECIPE, description=__doc__)
