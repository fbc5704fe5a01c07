"""LoRA finetuning: finetune/sft.py with low-rank adapters (lora.py) trained alone, the base weights frozen.

    python finetune/lora.py --initial_checkpoint_dir checkpoints/TinyLlama-1.1B --data_dir data/guanaco_sft \
        --lora_r 16 --out_dir out/tinyllama-chat-lora

Adapters on q and v (Hugging Face PEFT's default; --lora_targets chooses among q, k, v, proj, fc_1, fc_2, mlp_proj),
r 8, alpha 16, dropout 0.05, lr 2e-4 (QLoRA's, the defaults of the script TinyLlama's sft/finetune.py grew from);
the rest is TinyLlama-Chat v0.1's recipe (finetune/sft.py). Training checkpoints hold the adapters and their
optimizer state only; resuming (--resume auto) takes the frozen weights from --initial_checkpoint_dir again.
out_dir/final is a normal checkpoint directory of the merged weights (for generate, chat, eval and the converters)
with the adapters beside them: lora_adapters.pth and lora_config.json.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.sft import setup
from utils import cli

RECIPE = dict(
    out_dir=Path("out/tinyllama-chat-lora"),
    lora_r=8,
    lora_alpha=16.0,
    lora_dropout=0.05,
    lora_targets=["q", "v"],
    learning_rate=2e-4,
)

if __name__ == "__main__":
    cli(setup, defaults=RECIPE, description=__doc__)
