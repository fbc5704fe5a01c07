"""Validation loss and perplexity of a checkpoint: Inheritune's metric, and pretraining's validation.

Over packed shards (the `validation*` files of a prepared data directory), read as pretraining reads them, so the
loss is the very number pretraining logs for the same blocks (`training.summed_loss`, all-reduced over devices):

    python eval/perplexity.py --checkpoint_dir out/tinyllama_1b/final --data_dir data/slimpajama/validation \
        --eval_iters 100 --micro_batch_size 8

or over text files, each tokenized as one document (BOS first, as the data preparers do) and cut into blocks:

    python eval/perplexity.py --checkpoint_dir out/tinyllama_1b/final --text_files notes.txt README.md

Blocks hold seq_len + 1 tokens (seq_len inputs, each predicting the next); every token of a block after the first is
a target. Rank r of P processes takes blocks r, r + P, ... By default every block is read: the last micro-batch of a
process may hold fewer blocks, and over text files the tail that fills no block is a shorter last block, so every
token after the first is scored. (Tokens at the end of a shard file that fill no block are not: pretraining never
reads them either; they are counted.) --eval_iters N reads N whole micro-batches per process instead, as
pretraining's validation does.
"""

import math
import sys
from pathlib import Path
from typing import Iterable, Iterator, List, Literal, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpoint import quantization_of  # noqa: E402
from generation import load_inference_model  # noqa: E402
from quantize import QuantizeMode  # noqa: E402
from packed_dataset import validation_batches  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402
from training import summed_loss  # noqa: E402
from utils import UserError, cli  # noqa: E402

def main(
    checkpoint_dir: Path,
    data_dir: Optional[Path] = None,
    text_files: Optional[List[Path]] = None,
    seq_len: Optional[int] = None,
    micro_batch_size: int = 8,
    eval_iters: Optional[int] = None,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    devices: int = 1,
    precision: Optional[Literal["32-true", "bf16-true", "16-true", "64-true"]] = None,
    quantize: Optional[QuantizeMode] = None,
    group_size: int = 64,
) -> dict:
    """Print and return the loss (mean cross-entropy in nats per target token), the perplexity exp(loss), and the
    counts of blocks and target tokens.

    Args:
        checkpoint_dir: directory with lit_model.pth, model_config.json and the tokenizer
        data_dir: directory of packed shards whose validation* files are read (a prepared data directory)
        text_files: text files to read instead, each one document
        seq_len: inputs per block; default the model's block_size (pretraining's)
        micro_batch_size: blocks per forward pass
        eval_iters: whole micro-batches per process (pretraining's --eval_iters); default: every block
        device: auto (CUDA if available), cpu or cuda
        devices: processes (one per device); their sums are all-reduced
        precision: the weights' dtype (default 32-true; a quantized model's: its kernels'); the log-softmax is in
            fp32 whatever it is
        quantize: int8 or int4 weight-only quantization of the linear layers at load (quantize.py)
        group_size: int4's group of input channels: 32, 64 or 128
    """
    from lightning_fabric import Fabric

    if (data_dir is None) == (not text_files):
        raise UserError("Give either --data_dir (packed shards) or --text_files")
    if micro_batch_size < 1 or any(value is not None and value < 1 for value in (eval_iters, seq_len)):
        raise UserError(f"--micro_batch_size ({micro_batch_size}), --eval_iters ({eval_iters}) and --seq_len "
                        f"({seq_len}) must be at least 1")
    absent = [path for path in text_files or [] if not Path(path).is_file()]
    if absent:  # before the model is loaded
        raise FileNotFoundError(f"--text_files: {absent[0]} is not a file")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise FileNotFoundError(f"--data_dir {data_dir} is not a directory")
    fabric = Fabric(accelerator=device, devices=devices, strategy="ddp" if devices > 1 else "auto")
    fabric.launch()
    quantized = quantize is not None or quantization_of(checkpoint_dir) is not None
    precision = precision or (None if quantized else "32-true")  # a quantized model: its kernels' dtype
    model = load_inference_model(checkpoint_dir, fabric.device, precision, quantize, group_size)
    seq_len = seq_len or model.config.block_size
    if seq_len > model.config.block_size:
        raise UserError(f"--seq_len {seq_len} exceeds the block_size {model.config.block_size} of {checkpoint_dir}")
    ranks = dict(num_processes=fabric.world_size, process_rank=fabric.global_rank)
    source = f"--data_dir {data_dir}" if data_dir is not None else f"--text_files {' '.join(map(str, text_files))}"
    if data_dir is not None:
        packed = validation_batches(Path(data_dir), seq_len + 1, micro_batch_size, **ranks, flag="--data_dir")
        packed.check_vocabulary(model.config.vocab_size, str(Path(checkpoint_dir) / "model_config.json"))
        blocks, rank_blocks = packed.dataset, packed.dataset.n_blocks
        whole_batches, unread = len(packed), packed.dataset.n_skipped_tokens
    else:
        tokens = text_tokens(checkpoint_dir, text_files)
        blocks = text_blocks(tokens, seq_len + 1, **ranks)
        rank_blocks = len(blocks)
        whole_batches, unread = len(tokens) // (seq_len + 1) // fabric.world_size // micro_batch_size, 0
    n_batches = None if eval_iters is None else min(eval_iters, whole_batches)
    if n_batches == 0:
        raise UserError(f"{source} make no micro-batch of {micro_batch_size} blocks of {seq_len + 1} "
                        f"tokens on each of the {fabric.world_size} processes: lower --micro_batch_size or --seq_len, "
                        f"or read every block (no --eval_iters)")
    model.eval()
    read = rank_blocks if n_batches is None else n_batches * micro_batch_size
    totals = torch.cat((summed_loss(model, micro_batches(blocks, micro_batch_size), n_batches, fabric.device),
                        torch.tensor([read], dtype=torch.float64, device=fabric.device)))
    loss_total, target_tokens, n_blocks = fabric.all_reduce(totals, reduce_op="sum").tolist()
    if target_tokens == 0:
        raise UserError(f"{source} hold no block of two tokens or more")
    loss = loss_total / target_tokens
    result = dict(loss=loss, perplexity=math.exp(loss), blocks=int(n_blocks), target_tokens=int(target_tokens),
                  seq_len=seq_len, unread_tokens=unread)
    fabric.print(f"loss {loss:.4f}, perplexity {math.exp(loss):.3f} over {result['blocks']:,} blocks of up to "
                 f"{seq_len + 1} tokens ({result['target_tokens']:,} target tokens)"
                 + (f"; {unread:,} tokens at shard file ends fill no block and were not read" if unread else ""))
    return result


def text_tokens(checkpoint_dir: Path, text_files: List[Path]) -> List[int]:
    """Every file's tokens, BOS first when the tokenizer has one, concatenated."""
    tokenizer = Tokenizer(checkpoint_dir)
    tokens: List[int] = []
    for path in text_files:
        tokens += tokenizer.encode(Path(path).read_text(encoding="utf-8"), bos=tokenizer.bos_id is not None)
    return tokens


def text_blocks(tokens: List[int], block_size: int, num_processes: int, process_rank: int) -> List[torch.Tensor]:
    """Rank process_rank's blocks r, r + P, ... of `tokens` cut into blocks of `block_size` from the start; the tail
    is a shorter last block (if it has a target: two tokens or more)."""
    starts = range(0, len(tokens) - 1, block_size)
    return [torch.tensor(tokens[start: start + block_size]) for start in starts[process_rank::num_processes]]


def micro_batches(blocks: Iterable[torch.Tensor], micro_batch_size: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) of up to micro_batch_size consecutive blocks of one length; the last may hold fewer."""
    batch: List[torch.Tensor] = []
    for block in blocks:
        if batch and (len(batch) == micro_batch_size or len(block) != len(batch[0])):
            yield inputs_and_targets(batch)
            batch = []
        batch.append(block)
    if batch:
        yield inputs_and_targets(batch)


def inputs_and_targets(batch: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    stacked = torch.stack(batch)
    return stacked[:, :-1], stacked[:, 1:]


if __name__ == "__main__":
    cli(main)
