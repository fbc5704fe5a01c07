"""TinyLlama's code continuation at 8,192 tokens: pretrain/tinyllama_code.py with a 4x longer context by linear RoPE
position interpolation. Our extension: TinyLlama defines the config (`code_tiny_LLaMA_1b`: block 8192, RoPE
condense ratio 4) but no script of its uses it.

    python pretrain/tinyllama_code_8k.py

`--rope_condense_ratio 4` divides every position by 4, so the 8,192 positions take the angles of the 2,048 the
weights were trained on (tiny_LLaMA_1b at ratio 4 is code_tiny_LLaMA_1b), and the continued training adapts the
model to the finer spacing (Chen et al. 2023, "Extending context window of large language models via positional
interpolation"). The data: StarCoder in shards that hold whole 8,193-token blocks (256 per shard):

    python prepare_data/prepare_starcoder.py --source_path data/starcoderdata --split train --chunk_size 2097408 \
        --tokenizer_path checkpoints/TinyLlama-1.1B --destination_path data/starcoder_8k

Our choices beside TinyLlama's values (see pretrain/tinyllama_code.py): 96 sequences of 8,192 tokens per step
(786,432 tokens, near the 737,280 of 360 x 2,048; 96 divides on 1, 2, 3, 4, 6 and 8 devices), micro-batch 1, the
same 10,000 steps (7.9B tokens). On smaller GPUs add --activation_checkpointing (and --fsdp_cpu_offload).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pretrain.tinyllama import setup
from pretrain.tinyllama_code import RECIPE as CODE_RECIPE
from utils import cli

RECIPE = dict(
    CODE_RECIPE,
    out_dir=Path("out/tinyllama_code_8k"),
    train_data_dir=Path("data/starcoder_8k"),
    rope_condense_ratio=4,
    seq_len=8192,
    global_batch_size=96,
    micro_batch_size=1,
)

if __name__ == "__main__":
    cli(setup, defaults=RECIPE, description=__doc__)
