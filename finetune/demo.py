"""The SFT demo: teach the pretraining demo's model to answer questions about Python, on the CPU, with no download.

    python pretrain/demo.py      # first: the pretrained demo model in out/demo/final
    python finetune/demo.py

It builds instruction data from the Python standard library if `data_dir` does not hold it
(prepare_data/prepare_sft_demo.py: "What does json.dumps do?" -> the first paragraph of its docstring, "Write the
body of ..." -> the function's body), rendered with the guanaco template ("### Human: ... ### Assistant: ...")
and tokenized with the demo tokenizer; finetunes out/demo/final on it with finetune/sft.py (DEMO's settings, the
loss on the answers only); prints the validation loss on the held-out answers before and after; and asks the
finetuned model a held-out question through generate/chat.py. Running it again continues the run (or, if it is
complete, asks again).
"""

import json
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpoint import WEIGHTS_FILE
from finetune.sft import setup
from generate.chat import main as chat
from prepare_data.prepare_sft_demo import build_sft_demo_data
from sft_data import HELD_OUT_FILE
from utils import UserError, cli

# full finetuning of the 4-layer "demo" model, on the CPU, in about 5 minutes with the data preparation
DEMO = dict(
    accelerator="cpu",
    devices=1,
    precision="32-true",
    global_batch_size=8,
    micro_batch_size=8,
    epochs=None,
    learning_rate=5e-4,  # a fifth of the pretraining demo's peak: enough to learn the format in a few hundred steps
    warmup_steps=20,
    lr_schedule="constant",
    weight_decay=0.0,
    log_interval=20,
    save_interval=200,
    resume="auto",  # running the demo again continues it (or, if it is complete, asks again)
    seed=3407,
)


def demo(checkpoint_dir: Path = Path("out/demo/final"), data_dir: Path = Path("data/sft_demo"),
         out_dir: Path = Path("out/sft_demo"), max_steps: int = 400, eval_interval: int = 100,
         eval_iters: int = 100, max_files: Optional[int] = None, request: Optional[str] = None,
         max_new_tokens: int = 100) -> None:
    """Build the demo's instruction data if missing, finetune the pretraining demo's model on it, ask it a question.

    Args:
        checkpoint_dir: the model to finetune: the final weights of `python pretrain/demo.py`
        data_dir: the prepared instruction data (built here, with checkpoint_dir's tokenizer, if missing)
        out_dir: checkpoints, logs and the final weights; running the demo again continues from them
        max_steps: optimizer steps of 8 examples
        eval_interval: steps between validations
        eval_iters: validation micro-batches (100 x 8 covers the demo's val split)
        max_files: build the data from the first max_files standard library files only (for a quick try); none: all
        request: the question asked at the end; none: the first held-out "What does ... do?" question
        max_new_tokens: the longest answer, in tokens
    """
    checkpoint_dir, data_dir, out_dir = Path(checkpoint_dir), Path(data_dir), Path(out_dir)
    for name, value in (("max_steps", max_steps), ("eval_interval", eval_interval), ("eval_iters", eval_iters),
                        ("max_files", max_files), ("max_new_tokens", max_new_tokens)):
        if value is not None and value < 1:  # before the data is built and the model trained, which take minutes
            raise UserError(f"--{name} must be at least 1, got {value}")
    if not (checkpoint_dir / WEIGHTS_FILE).is_file():
        raise UserError(f"--checkpoint_dir {checkpoint_dir} holds no {WEIGHTS_FILE}: run `python pretrain/demo.py` "
                        f"first, or give the final directory of another pretraining run")
    if not (data_dir / HELD_OUT_FILE).is_file():  # written last: a directory without it is incomplete
        build_sft_demo_data(data_dir, tokenizer_dir=checkpoint_dir, max_files=max_files)
    setup(**DEMO, initial_checkpoint_dir=checkpoint_dir, data_dir=data_dir, out_dir=out_dir, max_steps=max_steps,
          eval_interval=eval_interval, eval_iters=eval_iters)
    if request is None:
        requests = json.loads((data_dir / HELD_OUT_FILE).read_text())
        request = next((text for text in requests if text.startswith("What does")), requests[0])
    final = out_dir / "final"
    print(f"\nA question the model was not trained on, asked through generate/chat.py:\n  {request}", flush=True)
    chat(final, prompt=request, max_new_tokens=max_new_tokens, temperature=0.2, top_k=50, seed=DEMO["seed"])
    print(f"\nMore: python generate/chat.py --checkpoint_dir {final} --prompt 'What does json.dumps do?'")


if __name__ == "__main__":
    cli(demo)
