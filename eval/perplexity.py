"""Validation loss and perplexity of a checkpoint: Inheritune's metric, and pretraining's validation.

Over packed shards (the `validation*` files of a prepared data directory), read as pretraining reads them, so the
loss is the very number pretraining logs for the same blocks (`training.summed_loss`, all-reduced over devices):

    python eval/perplexity.py --checkpoint_dir out/tinyllama_1b/final --data_dir data/slimpajama/validation \
        --eval_iters 100 --micro_batch_size 8

or over text files, each tokenized as one document (BOS first, as the data preparers do) and cut into blocks:

    python eval/perplexity.py --checkpoint_dir out/tinyllama_1b/final --text_files notes.txt README.md

Blocks hold seq_len + 1 tokens (seq_len inputs, each predicting the next); every token of a block after the first is
a target. Rank r of P processes takes blocks r, r + P, ...; --eval_iters micro-batches per process, or all: every
full micro-batch (blocks that do not fill one micro-batch on every process are left out; one process with
--micro_batch_size 1 reads every block).
"""

import math
import sys
from pathlib import Path
from typing import Iterator, List, Literal, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpoint import load_model  # noqa: E402
from packed_dataset import validation_batches  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402
from training import summed_loss  # noqa: E402
from utils import UserError, cli  # noqa: E402

PRECISIONS = {"32-true": torch.float32, "bf16-true": torch.bfloat16, "64-true": torch.float64}


def main(
    checkpoint_dir: Path,
    data_dir: Optional[Path] = None,
    text_files: Optional[List[Path]] = None,
    seq_len: Optional[int] = None,
    micro_batch_size: int = 8,
    eval_iters: Optional[int] = None,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    devices: int = 1,
    precision: Literal["32-true", "bf16-true", "64-true"] = "32-true",
) -> dict:
    """Print and return the loss (mean cross-entropy in nats per target token), the perplexity exp(loss), and the
    counts of blocks and target tokens.

    Args:
        checkpoint_dir: directory with lit_model.pth, model_config.json and the tokenizer
        data_dir: directory of packed shards whose validation* files are read (a prepared data directory)
        text_files: text files to read instead, each one document
        seq_len: inputs per block; default the model's block_size (pretraining's)
        micro_batch_size: blocks per forward pass
        eval_iters: micro-batches per process (pretraining's --eval_iters); default all of them
        device: auto (CUDA if available), cpu or cuda
        devices: processes (one per device); their sums are all-reduced
        precision: the weights' dtype; the log-softmax is in fp32 whatever it is
    """
    from lightning_fabric import Fabric

    if (data_dir is None) == (not text_files):
        raise UserError("Give either --data_dir (packed shards) or --text_files")
    if micro_batch_size < 1 or (eval_iters is not None and eval_iters < 1):
        raise UserError(f"--micro_batch_size ({micro_batch_size}) and --eval_iters ({eval_iters}) must be at least 1")
    fabric = Fabric(accelerator=device, devices=devices, strategy="ddp" if devices > 1 else "auto")
    fabric.launch()
    model = load_model(checkpoint_dir, device=fabric.device, dtype=PRECISIONS[precision])
    seq_len = seq_len or model.config.block_size
    if seq_len > model.config.block_size:
        raise UserError(f"--seq_len {seq_len} exceeds the block_size {model.config.block_size} of {checkpoint_dir}")
    ranks = dict(num_processes=fabric.world_size, process_rank=fabric.global_rank)
    if data_dir is not None:
        batches = validation_batches(Path(data_dir), seq_len + 1, micro_batch_size, **ranks)
        batches.check_vocabulary(model.config.vocab_size, str(Path(checkpoint_dir) / "model_config.json"))
    else:
        batches = TextBlocks(text_tokens(checkpoint_dir, text_files), seq_len + 1, micro_batch_size, **ranks)
    n_batches = len(batches) if eval_iters is None else min(eval_iters, len(batches))
    if n_batches == 0:
        raise UserError(f"{data_dir or text_files} make no micro-batch of {micro_batch_size} blocks of {seq_len + 1} "
                        f"tokens on each of the {fabric.world_size} processes: lower --micro_batch_size or --seq_len")
    model.eval()
    totals = fabric.all_reduce(summed_loss(model, batches, n_batches, fabric.device), reduce_op="sum")
    loss_total, target_tokens = totals.tolist()
    loss = loss_total / target_tokens
    result = dict(loss=loss, perplexity=math.exp(loss), blocks=n_batches * micro_batch_size * fabric.world_size,
                  target_tokens=int(target_tokens), seq_len=seq_len)
    fabric.print(f"loss {loss:.4f}, perplexity {math.exp(loss):.3f} over {result['blocks']:,} blocks of "
                 f"{seq_len + 1} tokens ({result['target_tokens']:,} target tokens)")
    return result


def text_tokens(checkpoint_dir: Path, text_files: List[Path]) -> List[int]:
    """Every file's tokens, BOS first when the tokenizer has one, concatenated."""
    tokenizer = Tokenizer(checkpoint_dir)
    tokens: List[int] = []
    for path in text_files:
        if not Path(path).is_file():
            raise UserError(f"--text_files: {path} is not a file")
        tokens += tokenizer.encode(Path(path).read_text(encoding="utf-8"), bos=tokenizer.bos_id is not None)
    return tokens


class TextBlocks:
    """A batch source (training.BatchSource) over a token list cut into blocks of `block_size` tokens from its start
    (the tail that fills no block is left out): rank r takes blocks r, r + P, ...; each iter() starts over."""

    pad_id = None

    def __init__(self, tokens: List[int], block_size: int, micro_batch_size: int, num_processes: int,
                 process_rank: int) -> None:
        blocks = torch.tensor(tokens[: len(tokens) // block_size * block_size], dtype=torch.long)
        self.blocks = blocks.view(-1, block_size)[process_rank::num_processes]
        # every process must take as many micro-batches: the fewest any process has
        self.length = len(tokens) // block_size // num_processes // micro_batch_size
        self.micro_batch_size = micro_batch_size

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for i in range(self.length):
            batch = self.blocks[i * self.micro_batch_size: (i + 1) * self.micro_batch_size]
            yield batch[:, :-1], batch[:, 1:]

    def __len__(self) -> int:
        return self.length


if __name__ == "__main__":
    cli(main)
