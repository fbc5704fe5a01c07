"""training.py's loop with batch sources made here: the masked loss against a hand-computed reference, its
independence of how sequences fall into micro-batches, token counts with padding; and its pieces against closed
forms: the schedules, the global batch, the weight-decay groups, FLOPs per token and peak FLOP/s."""

import copy
import csv
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from checkpoint import load_model, load_state_dict
from model import GPT, Config, num_parameters
from packed_dataset import PackedBatches, PackedDataset
from shard_format import PackedDatasetBuilder
from training import (IGNORE_INDEX, TrainingSettings, build_model, build_optimizer, checkpoint_blocks, fit, get_lr,
                      gradient_accumulation_steps, interpolate_positions, launch_fabric, loss_sum, parameter_groups,
                      peak_flops, training_flops_per_token)

PAD_ID = 0
SETTINGS = TrainingSettings(
    out_dir=Path("unused"), global_batch_size=8, micro_batch_size=1, seq_len=None, max_steps=3, max_tokens=None,
    epochs=None, max_time=None, learning_rate=1e-2, min_lr=1e-3, warmup_steps=1, lr_schedule="cosine",
    grad_clip=1.0, log_interval=1, eval_interval=100, eval_iters=1, save_interval=100, tokenizer_dir=None,
)


class ListBatches:
    """A batch source over fixed examples, `micro_batch_size` at a time, endlessly; the state is the position."""

    pad_id = PAD_ID

    def __init__(self, input_ids: torch.Tensor, targets: torch.Tensor, micro_batch_size: int) -> None:
        self.input_ids, self.targets, self.micro_batch_size = input_ids, targets, micro_batch_size
        self.position = 0

    def __iter__(self):
        while True:
            rows = [(self.position + i) % len(self.input_ids) for i in range(self.micro_batch_size)]
            self.position += self.micro_batch_size
            yield self.input_ids[rows], self.targets[rows]

    def __len__(self) -> int:
        return len(self.input_ids) // self.micro_batch_size

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def sft_like_examples(n: int = 8, length: int = 12, vocab_size: int = 256):
    """Right-padded sequences whose targets are masked over a prompt and the padding: target counts from 0 to 9."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, vocab_size, (n, length), generator=generator)
    targets = torch.randint(1, vocab_size, (n, length), generator=generator)
    for row in range(n):
        prompt, end = row % 4, length - row // 2  # tokens [prompt, end) carry a loss; from `end` on, padding
        targets[row, :prompt] = IGNORE_INDEX
        targets[row, end:] = IGNORE_INDEX
        input_ids[row, end:] = PAD_ID
    targets[5] = IGNORE_INDEX  # an example with no target at all
    return input_ids, targets


def logged(out_dir: Path) -> dict:
    rows = {}
    for path in sorted((out_dir / "logs").glob("version_*/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                rows.setdefault(int(row["step"]), {}).update({k: float(v) for k, v in row.items() if v and k != "step"})
    return rows


def train(out_dir: Path, train_data, settings: TrainingSettings, seed: int = 7, sgd: bool = False,
          config: Config = Config.from_name("micro")) -> GPT:
    """`sgd`: plain SGD, whose update is proportional to the gradient, where Adam's normalised update would turn a
    rounding difference in a near-zero gradient into a large one."""
    fabric = launch_fabric("1", 1, "cpu", "fsdp", "32-true", out_dir, None)
    model = build_model(fabric, config, seed, None, compile=False)
    if sgd:
        optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=settings.learning_rate))
    else:
        optimizer = build_optimizer(fabric, model, settings.learning_rate, 0.1, (0.9, 0.95), 1e-8, False)
    fit(fabric, model, optimizer, config, train_data, None, replace(settings, out_dir=out_dir), {"seed": seed})
    return model.module


def test_masked_loss_is_summed_over_targets_and_divided_by_the_step_count(tmp_path):
    """Step 1's loss is the cross-entropy of the initial model over the step's target tokens, all examples pooled
    (not a mean of per-micro-batch means, which would weigh the tokens of short examples more); and the same when
    the 8 examples come as 8 micro-batches of 1 or 2 of 4: also the trained weights."""
    input_ids, targets = sft_like_examples()
    torch.manual_seed(7)
    reference_model = GPT(Config.from_name("micro"))
    with torch.no_grad():
        logits = reference_model(input_ids)
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX).item()

    weights = {}
    for micro_batch_size in (1, 4):
        out = tmp_path / f"mbs{micro_batch_size}"
        model = train(out, ListBatches(input_ids, targets, micro_batch_size),
                      replace(SETTINGS, micro_batch_size=micro_batch_size), sgd=True)
        metrics = logged(out)
        assert metrics[1]["loss"] == pytest.approx(expected, rel=1e-6)
        assert metrics[3]["target_tokens"] == 3 * int((targets != IGNORE_INDEX).sum())
        assert metrics[3]["tokens"] == 3 * int((input_ids != PAD_ID).sum())  # padding is not counted
        weights[micro_batch_size] = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    for name, tensor in weights[1].items():
        torch.testing.assert_close(weights[4][name], tensor, rtol=1e-5, atol=1e-7)


def test_a_tied_head_stays_the_embedding_through_training_and_its_checkpoint(tmp_path):
    """One Parameter, counted once, without weight decay (the embedding's rule); after 3 AdamW steps the model and
    its final weights still have one tensor for both, and it trained."""
    config = Config.from_name("micro", tie_embeddings=True)
    torch.manual_seed(7)
    initial = GPT(config).transformer.wte.weight.detach().clone()
    assert num_parameters(GPT(config)) == num_parameters(GPT(Config.from_name("micro"))) - initial.numel()
    tied = GPT(config)
    decay, no_decay = parameter_groups(tied, weight_decay=0.1, decay_all_params=False)
    assert any(param is tied.lm_head.weight for param in no_decay["params"])
    assert not any(param is tied.lm_head.weight for param in decay["params"])

    model = train(tmp_path / "out", ListBatches(*sft_like_examples(), 4), replace(SETTINGS, micro_batch_size=4),
                  config=config)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert not torch.equal(model.lm_head.weight.detach(), initial)
    saved = load_state_dict(tmp_path / "out" / "final" / "lit_model.pth")
    assert saved["lm_head.weight"].data_ptr() == saved["transformer.wte.weight"].data_ptr()  # stored once
    loaded = load_model(tmp_path / "out" / "final")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight.detach(), rtol=0, atol=0)


def test_packed_blocks_loss_is_the_mean_cross_entropy(tmp_path):
    """Every position of a packed block is a target: the step's loss is the plain mean cross-entropy."""
    blocks = torch.randint(0, 256, (8, 13), generator=torch.Generator().manual_seed(1))
    builder = PackedDatasetBuilder(tmp_path / "data", "train", chunk_size=13 * 8, vocab_size=256)
    builder.add_array(blocks.flatten().numpy().astype("uint16"))
    builder.finish()
    dataset = PackedDataset(sorted(map(str, (tmp_path / "data").glob("*.bin"))), n_chunks=1, block_size=13,
                            shuffle=False, wrap=True)
    torch.manual_seed(7)
    with torch.no_grad():
        logits = GPT(Config.from_name("micro"))(blocks[:, :-1])
    expected = F.cross_entropy(logits.flatten(0, 1), blocks[:, 1:].flatten()).item()
    train(tmp_path / "out", PackedBatches(dataset, 2, "test"), replace(SETTINGS, micro_batch_size=2, seq_len=12,
                                                                       max_steps=1))
    metrics = logged(tmp_path / "out")
    assert metrics[1]["loss"] == pytest.approx(expected, rel=1e-6)
    assert metrics[1]["tokens"] == metrics[1]["target_tokens"] == 8 * 12


def test_linear_and_constant_schedules():
    lr, min_lr, warmup, max_steps = 1e-3, 1e-4, 10, 110
    linear = [get_lr(step, lr, min_lr, warmup, max_steps, "linear") for step in range(120)]
    assert linear[:warmup] == pytest.approx([lr * (i + 1) / warmup for i in range(warmup)])
    assert linear[warmup] == pytest.approx(lr)
    assert linear[warmup + 50] == pytest.approx((lr + min_lr) / 2)
    assert linear[warmup + 25] == pytest.approx(lr - (lr - min_lr) / 4)
    assert linear[max_steps:] == pytest.approx([min_lr] * 10)
    constant = [get_lr(step, lr, min_lr, warmup, max_steps, "constant") for step in range(120)]
    assert constant[:warmup] == linear[:warmup]
    assert constant[warmup:] == [lr] * (120 - warmup)
    assert get_lr(5, lr, min_lr, 0, max_steps, "constant") == lr
    assert get_lr(60, lr, min_lr, warmup, max_steps, "cosine") == pytest.approx(
        min_lr + (lr - min_lr) * (1 + math.cos(math.pi / 2)) / 2)


def test_epochs_count_examples_of_the_batch_source(tmp_path):
    """An epoch is len(source) micro-batches: 8 examples, global batch 4 -> 2 steps per epoch, 3 epochs = 6 steps."""
    input_ids, targets = sft_like_examples()
    train(tmp_path / "out", ListBatches(input_ids, targets, 2),
          replace(SETTINGS, global_batch_size=4, micro_batch_size=2, max_steps=None, epochs=3, lr_schedule="constant"))
    metrics = logged(tmp_path / "out")
    assert max(step for step, row in metrics.items() if "loss" in row) == 6
    assert metrics[6]["learning_rate"] == pytest.approx(1e-2)
    with pytest.raises(ValueError, match="--max_tokens needs sequences of a fixed length"):
        train(tmp_path / "tokens", ListBatches(input_ids, targets, 2),
              replace(SETTINGS, max_steps=None, max_tokens=1000))


def test_lr_schedule_warmup_cosine_then_flat():
    lr, min_lr, warmup, max_steps = 4e-4, 4e-5, 10, 110
    schedule = [get_lr(step, lr, min_lr, warmup, max_steps) for step in range(130)]
    # linear warmup: step i (0-based) trains at lr * (i + 1) / warmup, reaching lr at the last warmup step
    assert schedule[:warmup] == pytest.approx([lr * (i + 1) / warmup for i in range(warmup)])
    # cosine from lr at the end of warmup to min_lr at max_steps, (lr + min_lr) / 2 halfway
    assert schedule[warmup] == pytest.approx(lr)
    assert schedule[warmup + 50] == pytest.approx((lr + min_lr) / 2)
    assert schedule[warmup + 25] == pytest.approx(min_lr + (lr - min_lr) * (1 + math.cos(math.pi / 4)) / 2)
    assert all(a >= b for a, b in zip(schedule[warmup:], schedule[warmup + 1:]))
    # constant min_lr from max_steps on
    assert schedule[max_steps:] == pytest.approx([min_lr] * (130 - max_steps))
    assert get_lr(0, lr, min_lr, 0, max_steps) == pytest.approx(lr)  # no warmup


@pytest.mark.parametrize("devices, num_nodes, expected", [(1, 1, 128), (2, 1, 64), (16, 1, 8), (8, 2, 8)])
def test_global_batch_is_global_whatever_the_devices(devices, num_nodes, expected):
    accumulation = gradient_accumulation_steps(1024, 8, devices * num_nodes)
    assert accumulation == expected
    assert accumulation * 8 * devices * num_nodes == 1024  # TinyLlama's 1024 sequences, not 1024 per node


def test_parameter_groups_decay_matrices_only():
    model = GPT(Config.from_name("micro", bias=True))
    names = {id(param): name for name, param in model.named_parameters()}
    decay, no_decay = parameter_groups(model, weight_decay=0.1, decay_all_params=False)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = {names[id(p)] for p in decay["params"]}
    expected = {name for name, p in model.named_parameters() if name.endswith(".weight") and p.ndim == 2}
    expected.discard("transformer.wte.weight")
    assert decayed == expected
    assert "lm_head.weight" in decayed and "transformer.h.0.attn.qkv.weight" in decayed
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert not_decayed == set(names.values()) - expected
    assert {"transformer.wte.weight", "transformer.ln_f.weight", "transformer.h.0.norm_1.weight",
            "transformer.h.0.attn.qkv.bias"} <= not_decayed

    (everything,) = parameter_groups(model, weight_decay=0.1, decay_all_params=True)  # the original TinyLlama
    assert {names[id(p)] for p in everything["params"]} == set(names.values())
    assert everything["weight_decay"] == 0.1


def test_flops_per_token_leaves_out_the_embedding_and_counts_causal_attention():
    config = Config.from_name("micro")
    model = GPT(config)
    n_params = sum(p.numel() for p in model.parameters())
    non_embedding = sum(p.numel() for name, p in model.named_parameters() if name != "transformer.wte.weight")
    expected = 6 * non_embedding + 6 * config.n_layer * config.n_embd * 32
    assert training_flops_per_token(config, n_params, seq_len=32) == expected
    # a tied head is counted once in the parameters, but its matmul costs as an untied head's: the same FLOPs
    tied = Config.from_name("micro", tie_embeddings=True)
    assert training_flops_per_token(tied, num_parameters(GPT(tied)), seq_len=32) == expected
    # TinyLlama-1.1B: 1,100,048,384 parameters of which 32000 x 2048 embedding
    tiny = Config.from_name("tiny_LLaMA_1b")
    assert training_flops_per_token(tiny, 1_100_048_384, 2048) == 6 * (1_100_048_384 - 65_536_000) + 6 * 22 * 2048**2


def test_peak_flops_known_gpus_in_bf16_only():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16-mixed") == 989e12
    assert peak_flops("NVIDIA H200", "bf16-true") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bf16-mixed") == 312e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "32-true") is None
    assert peak_flops("Tesla T4", "bf16-mixed") is None
    assert peak_flops(None, "bf16-mixed") is None


def test_activation_checkpointing_recomputes_blocks_with_the_same_gradients_and_keys():
    """float64, where a recomputed Block gives the same bits: every gradient of the checkpointed model equals the
    plain one's; each Block's attention runs twice (the recomputation in the backward, which stops once it has what
    the backward needs); the state dict's keys are the plain ones, so checkpoints go from one to the other."""
    torch.manual_seed(0)
    config = Config.from_name("micro")
    plain = GPT(config).double()
    checkpointed = copy.deepcopy(plain)
    checkpoint_blocks(checkpointed)
    calls = {name: [] for name in ("plain", "checkpointed")}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        for module in model.modules():
            if type(module).__name__ == "CausalSelfAttention":
                module.register_forward_hook(lambda *args, name=name: calls[name].append(1))
    idx = torch.randint(0, config.vocab_size, (2, 48))
    targets = torch.randint(0, config.vocab_size, (2, 48))
    for model in (plain, checkpointed):
        loss_sum(model(idx), targets).backward()
    assert len(calls["plain"]) == config.n_layer and len(calls["checkpointed"]) == 2 * config.n_layer
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()
    gradients = {name.replace("_checkpoint_wrapped_module.", ""): param.grad
                 for name, param in checkpointed.named_parameters()}
    for name, param in plain.named_parameters():
        assert torch.equal(param.grad, gradients[name]), name


def test_position_interpolation_scales_the_context_and_finds_the_named_config():
    code = interpolate_positions(Config.from_name("tiny_LLaMA_1b"), 4)
    assert code == Config.from_name("code_tiny_LLaMA_1b")  # TinyLlama's own 8k config, by name too
    assert interpolate_positions(code, 4) is code
    micro = interpolate_positions(Config.from_name("micro"), 2)
    assert (micro.name, micro.block_size, micro.rope_condense_ratio) == ("micro-rope2", 128, 2)
    assert interpolate_positions(micro, 4).block_size == 256
