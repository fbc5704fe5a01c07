"""eval/perplexity.py: the loss pretraining's validation reports for the same blocks, and a hand computation over
text files."""

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning_fabric import Fabric

from checkpoint import load_model, save_model_dir
from eval.perplexity import main
from model import GPT, Config
from packed_dataset import validation_batches
from shard_format import PackedDatasetBuilder, write_manifest
from test_pretrain import finish, launched
from tokenizer import Tokenizer
from training import validate
from utils import UserError

SEQ_LEN = 16


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    import sentencepiece as spm

    directory = tmp_path_factory.mktemp("checkpoint")
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(directory / "tokenizer"), vocab_size=200,
                                   model_type="bpe", minloglevel=2)
    corpus.unlink()
    config = Config.from_name("micro", vocab_size=200)
    torch.manual_seed(0)
    save_model_dir(GPT(config).state_dict(), config, directory, directory)
    return directory


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Validation shards of 13 blocks of SEQ_LEN + 1 tokens in 4 files."""
    directory = tmp_path_factory.mktemp("data")
    builder = PackedDatasetBuilder(directory, "validation_text_0", chunk_size=(SEQ_LEN + 1) * 4, vocab_size=200)
    builder.add_array(np.random.default_rng(0).integers(0, 200, 13 * (SEQ_LEN + 1)).astype(np.uint16))
    builder.finish()
    write_manifest(directory)
    return directory


def test_loss_over_packed_shards_is_pretrainings_validation_loss(checkpoint_dir, data_dir):
    result = main(checkpoint_dir, data_dir=data_dir, seq_len=SEQ_LEN, micro_batch_size=2, eval_iters=3, device="cpu")
    fabric = Fabric(accelerator="cpu", devices=1)
    model = load_model(checkpoint_dir)
    expected = validate(fabric, model, validation_batches(data_dir, SEQ_LEN + 1, 2, 1, 0), 3)
    assert result["loss"] == pytest.approx(expected, rel=1e-12)
    assert result["perplexity"] == pytest.approx(math.exp(expected))
    assert (result["blocks"], result["target_tokens"]) == (6, 6 * SEQ_LEN)

    # all of them (the default): every block, the last micro-batch holding the 13th alone
    everything = main(checkpoint_dir, data_dir=data_dir, seq_len=SEQ_LEN, micro_batch_size=2, device="cpu")
    assert (everything["blocks"], everything["target_tokens"], everything["unread_tokens"]) == (13, 13 * SEQ_LEN, 0)
    assert everything["loss"] == pytest.approx(
        validate(fabric, model, validation_batches(data_dir, SEQ_LEN + 1, 1, 1, 0), 13), rel=1e-6)  # fp32, batched


def test_loss_over_text_files_is_the_mean_cross_entropy_of_every_token(checkpoint_dir, tmp_path):
    """Every token after the first is scored: whole blocks, a last micro-batch of fewer blocks and the shorter tail
    block; --eval_iters reads whole micro-batches only."""
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    files[0].write_text("the lazy dog jumps over the quick brown fox, line 12. " * 3)
    files[1].write_text("brown dogs and quick foxes " * 4 + "at last")
    tokenizer = Tokenizer(checkpoint_dir)
    tokens = torch.tensor(sum((tokenizer.encode(path.read_text(), bos=True) for path in files), []))
    n_whole = len(tokens) // (SEQ_LEN + 1)
    assert n_whole % 2 == 1 and len(tokens) % (SEQ_LEN + 1) > 1  # a micro-batch of one, and a tail
    model = load_model(checkpoint_dir)
    with torch.no_grad():  # one sequence at a time, each block on its own
        losses = [F.cross_entropy(model(block[None, :-1])[0], block[1:], reduction="sum")
                  for block in tokens.split(SEQ_LEN + 1) if len(block) > 1]
    result = main(checkpoint_dir, text_files=files, seq_len=SEQ_LEN, micro_batch_size=2, device="cpu")
    assert (result["blocks"], result["target_tokens"]) == (n_whole + 1, len(tokens) - n_whole - 1)
    assert result["loss"] == pytest.approx((sum(losses) / result["target_tokens"]).item(), rel=1e-5)

    some = main(checkpoint_dir, text_files=files, seq_len=SEQ_LEN, micro_batch_size=2, eval_iters=100, device="cpu")
    assert (some["blocks"], some["target_tokens"]) == (n_whole // 2 * 2, n_whole // 2 * 2 * SEQ_LEN)
    assert some["loss"] == pytest.approx((sum(losses[: n_whole // 2 * 2]) / some["target_tokens"]).item(), rel=1e-5)


def test_bad_arguments_name_the_fix(checkpoint_dir, data_dir):
    with pytest.raises(UserError, match="either --data_dir"):
        main(checkpoint_dir, device="cpu")
    with pytest.raises(UserError, match="exceeds the block_size"):
        main(checkpoint_dir, data_dir=data_dir, seq_len=1000, device="cpu")
    with pytest.raises(UserError, match="make no micro-batch"):
        main(checkpoint_dir, data_dir=data_dir, seq_len=SEQ_LEN, micro_batch_size=20, eval_iters=1, device="cpu")


def loss_and_blocks(output: str) -> tuple:
    """(loss, blocks) that eval/perplexity.py printed."""
    loss, blocks = re.search(r"loss ([0-9.]+), perplexity [0-9.]+ over (\d+) blocks", output).groups()
    return float(loss), int(blocks)


def test_two_processes_all_reduce_to_the_loss_of_the_same_blocks_read_by_one(checkpoint_dir, data_dir):
    """Rank r of 2 reads blocks r, r + 2, ...: 3 micro-batches of 1 block each cover the blocks 0..5 that one
    process reads as 3 micro-batches of 2; reading every block, the 7 and 6 blocks of the two ranks are the 13.
    (The two launches of eval/perplexity.py --devices 2 run side by side, and this process's references meanwhile.)"""
    flags = dict(checkpoint_dir=checkpoint_dir, data_dir=data_dir, seq_len=SEQ_LEN, device="cpu", devices=2)
    with launched(("eval/perplexity.py", dict(flags, micro_batch_size=1, eval_iters=3)),
                  ("eval/perplexity.py", dict(flags, micro_batch_size=3))) as (some, every):
        one = main(checkpoint_dir, data_dir=data_dir, seq_len=SEQ_LEN, micro_batch_size=2, eval_iters=3, device="cpu")
        everything = main(checkpoint_dir, data_dir=data_dir, seq_len=SEQ_LEN, micro_batch_size=1, device="cpu")
        loss, blocks = loss_and_blocks(finish(some))
        assert loss == pytest.approx(one["loss"], abs=1e-4) and blocks == 6
        loss, blocks = loss_and_blocks(finish(every))
        assert loss == pytest.approx(everything["loss"], abs=1e-4) and blocks == everything["blocks"] == 13
