"""TinyLlama's code continuation: pretrain/tinyllama.py with the values of TinyLlama's `pretrain/tinyllama_code.py`.

    python pretrain/tinyllama_code.py

It continues a TinyLlama-1.1B checkpoint (TinyLlama started from its 503B-token intermediate step 240k; convert
the one you choose with scripts/convert_hf_checkpoint.py into checkpoints/TinyLlama-1.1B) on StarCoder alone, with
a fresh optimizer and schedule: the `train_starcoder` shards that TinyLlama's data preparation already wrote into
data/slim_star_combined (prepare_data/prepare_starcoder.py, see docs/data.md).

TinyLlama's values: tiny_LLaMA_1b at 2048 tokens, train_starcoder with weight 1, 360 sequences per step (6 GPUs x
micro-batch 6 x 10 accumulation there; here the accumulation follows from the devices), lr 2e-4 -> 2e-5 cosine with
no warmup, 10,000 steps (7.4B tokens), a checkpoint every 2,000 steps, AdamW betas (0.9, 0.95), weight decay 0.1,
clipping 1.0. Ours: micro-batch 5, which divides 360 on 1, 2, 3, 4, 6 and 8 devices (6 does not on 8); weight decay
on matrices only, as every recipe here (`--decay_all_params` decays every parameter, as the original). The model's
config and tokenizer come from the initial checkpoint. pretrain/tinyllama_code_8k.py is this recipe at 8,192 tokens.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pretrain.tinyllama import setup
from utils import cli

RECIPE = dict(
    initial_checkpoint_dir=Path("checkpoints/TinyLlama-1.1B"),
    out_dir=Path("out/tinyllama_code"),
    train_data_dir=Path("data/slim_star_combined"),
    val_data_dir=None,
    train_data_mix="train_starcoder",
    seq_len=2048,
    global_batch_size=360,
    micro_batch_size=5,
    max_steps=10_000,
    learning_rate=2e-4,
    min_lr=2e-5,
    warmup_steps=0,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.95,
    eps=1e-8,
    grad_clip=1.0,
    save_interval=2_000,
    eval_interval=2_000,
)

if __name__ == "__main__":
    cli(setup, defaults=RECIPE, description=__doc__)
