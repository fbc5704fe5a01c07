"""The demo: pretrain a tiny Llama on the CPU in minutes, with no download.

    python pretrain/demo.py

It builds the corpus of prepare_data/prepare_demo.py and its tokenizer if `data_dir` does not hold them, trains the
4-layer 'demo' model of model.py with pretrain/tinyllama.py's loop (DEMO's settings), and prints the validation loss
before and after and a sample. Running it again continues the run (or, if it is complete, samples again).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpoint import load_model
from generation import generate
from prepare_data.prepare_demo import prepare_demo
from pretrain.tinyllama import setup
from tokenizer import Tokenizer
from utils import UserError, cli

# The 4-layer "demo" model on the corpus of prepare_data/prepare_demo.py, on the CPU, in about 5 minutes
DEMO = dict(
    model_name="demo",
    train_data_mix="train_code,train_prose",
    accelerator="cpu",
    devices=1,
    precision="32-true",
    global_batch_size=8,  # small batches, many steps: what learns fastest early in training
    micro_batch_size=8,
    learning_rate=2e-3,
    min_lr=2e-4,
    warmup_steps=20,
    log_interval=20,
    save_interval=250,  # each checkpoint holds the optimizer too: about 60 MB
    resume="auto",  # running the demo again continues it (or, if it is complete, samples again)
    seed=3407,  # of the initial weights, the data order and the sample
)
PROMPT = "class Parser:"


def demo(data_dir: Path = Path("data/demo"), out_dir: Path = Path("out/demo"), max_steps: int = 500,
         eval_interval: int = 100, eval_iters: int = 16) -> None:
    """Build the demo corpus and its tokenizer if missing, train the 'demo' model on the CPU, print a sample.

    Args:
        data_dir: the demo corpus (built here if missing)
        out_dir: checkpoints, logs and the final weights; running the demo again continues from them
        max_steps: optimizer steps of 8 sequences of 256 tokens (500: 1M tokens, about 4 minutes on 2 CPU cores)
        eval_interval: steps between validations
        eval_iters: validation micro-batches
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    for name, value in (("max_steps", max_steps), ("eval_interval", eval_interval), ("eval_iters", eval_iters)):
        if value < 1:  # before the corpus is built, which takes minutes
            raise UserError(f"--{name} must be at least 1, got {value}")
    prepare_demo(data_dir)  # returns at once if the corpus is complete
    setup(**DEMO, train_data_dir=data_dir / "train", val_data_dir=data_dir / "validation", tokenizer_dir=data_dir,
          out_dir=out_dir, max_steps=max_steps, eval_interval=eval_interval, eval_iters=eval_iters)
    final = out_dir / "final"
    tokenizer = Tokenizer(final)
    model = load_model(final)
    torch.manual_seed(DEMO["seed"])
    prompt = torch.tensor(tokenizer.encode(PROMPT, bos=tokenizer.bos_id is not None))
    output = generate(model, prompt, max_new_tokens=100, temperature=0.8, top_k=50, stop_ids=[tokenizer.eos_id])
    print(f"\nSample from {final}:\n{tokenizer.decode(output)}\n")
    print(f"More: python generate/base.py --checkpoint_dir {final} --prompt 'import os'")


if __name__ == "__main__":
    cli(demo)
