"""finetune/sft.py and finetune/lora.py on a tiny model and SFT data written here (sft_data.write_split).

References: hand-built inputs and targets for the batches; each example alone (positions from 0, no neighbours)
for packing; one micro-batch of all examples, and one process, for the step's loss under other splits; the
uninterrupted run for resume; lora.merge_lora of the saved adapters for LoRA's merged weights.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sft_data
from chat_template import BUILTIN_TEMPLATES
from checkpoint import load_model, save_model_dir
from finetune.sft import save_finetuned, setup
from lora import ADAPTERS_FILE, CONFIG_FILE, LoRAConfig, merge_lora
from model import GPT, Config
from pretrain.tinyllama import setup as pretrain_setup
from sft_batches import SFTBatches
from sft_data import SFTSplit
from test_pretrain import finish, launched
from tokenizer import Tokenizer
from training import IGNORE_INDEX, summed_loss
from utils import UserError

ROOT = Path(__file__).resolve().parent.parent
CONFIG = Config(name="sft-test", block_size=64, vocab_size=250, n_layer=2, n_head=4, n_query_groups=2, n_embd=32,
                intermediate_size=64)
PAD_ID = 250  # the first embedding row past the vocabulary (padded to 256)
DATA_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def examples(n: int, seed: int) -> list:
    """(ids, mask) of n examples: a prompt of 2-7 tokens (no targets), then a response of 2-11 tokens (targets)."""
    rng = np.random.default_rng(seed)
    result = []
    for _ in range(n):
        prompt, response = int(rng.integers(2, 8)), int(rng.integers(2, 12))
        ids = rng.integers(1, CONFIG.vocab_size, prompt + response).tolist()
        result.append((ids, [False] * prompt + [True] * response))
    return result


def write_data(directory: Path, n_train: int = 16, n_val: int = 6, template: str = DATA_TEMPLATE) -> Path:
    splits = {"train": sft_data.write_split(directory, "train", examples(n_train, seed=1)),
              "val": sft_data.write_split(directory, "val", examples(n_val, seed=2))}
    sft_data.write_metadata(directory, {
        "chat_template": template, "chat_template_sha256": sft_data.template_sha256(template),
        "chat_template_name": "test", "tokenizer": {"file": "tokenizer.json", "sha256": "0" * 64, "vocab_size": 250},
        "max_seq_length": 64, "splits": splits, "skipped": {},
    })
    return directory


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("sft_data"))


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("base") / "base"
    save_model_dir(GPT(CONFIG), CONFIG, None, directory)
    return directory


def run_args(out_dir: Path, checkpoint_dir: Path, data_dir: Path, **overrides) -> dict:
    args = dict(initial_checkpoint_dir=checkpoint_dir, data_dir=data_dir, out_dir=out_dir, accelerator="cpu",
                devices=1, precision="32-true", global_batch_size=4, micro_batch_size=2, epochs=None, max_steps=4,
                learning_rate=1e-2, warmup_steps=0, lr_schedule="constant", log_interval=1, eval_interval=2,
                eval_iters=8, save_interval=2, seed=3)
    return {**args, **overrides}


def metrics(out_dir: Path) -> dict:
    import csv

    rows = {}
    for path in sorted((out_dir / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:])):
        with open(path) as f:
            for row in csv.DictReader(f):
                rows.setdefault(int(row["step"]), {}).update({k: float(v) for k, v in row.items() if v and k != "step"})
    return rows


def final_weights(out_dir: Path) -> dict:
    return torch.load(out_dir / "final" / "lit_model.pth", weights_only=True)


# ---- the batch source ------------------------------------------------------------------------------------------


def test_batches_mask_prompts_and_padding_and_prompts_get_no_gradient(data_dir):
    split = SFTSplit(data_dir, "train")
    batches = SFTBatches(split, 3, PAD_ID, num_processes=1, process_rank=0, seed=0, train=False, rows_per_step=3)
    input_ids, targets = next(iter(batches))
    assert input_ids.shape[1] == max(len(split[i][0]) for i in range(3)) - 1  # padded to the longest
    for row in range(3):
        ids, mask = split[row]
        n = len(ids) - 1
        assert input_ids[row, :n].tolist() == ids[:-1].tolist()
        assert targets[row, :n].tolist() == [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]
        assert (input_ids[row, n:] == PAD_ID).all() and (targets[row, n:] == IGNORE_INDEX).all()

    torch.manual_seed(0)
    logits = GPT(CONFIG)(input_ids)
    logits.retain_grad()
    F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum").backward()
    per_position = logits.grad.abs().sum(-1)
    assert (per_position[targets == IGNORE_INDEX] == 0).all()  # prompt and padding positions: no gradient at all
    assert (per_position[targets != IGNORE_INDEX] > 0).all()


def test_a_step_reads_the_same_examples_whatever_the_split_and_resumes_exactly(data_dir):
    """16 examples, global batch 8 (2 steps per epoch): one process x 8, or 2 processes x 2 x 2 accumulation, read
    the same 8 examples in a step; each epoch reads each example once, in a new order; a source resumed from its
    state_dict yields what the uninterrupted one does."""
    split = SFTSplit(data_dir, "train")

    def source(micro_batch_size, num_processes=1, rank=0):
        return SFTBatches(split, micro_batch_size, PAD_ID, num_processes=num_processes, process_rank=rank, seed=5,
                          train=True, rows_per_step=8)

    def first_inputs(batch):  # an example's identity: its first input tokens
        return {tuple(row[:2].tolist()) for row in batch[0]}

    single = iter(source(8))
    ranks = [iter(source(2, 2, rank)) for rank in range(2)]
    assert len(source(8)) == 2 and len(source(2, 2, 0)) == 4
    seen_epochs = []
    for epoch in range(2):
        seen = []
        for _ in range(2):
            expected = first_inputs(next(single))
            got = set().union(*(first_inputs(next(r)) for r in ranks for _ in range(2)))
            assert got == expected
            seen.append(expected)
        assert len(seen[0] | seen[1]) == 16
        seen_epochs.append(seen)
    assert seen_epochs[0][0] != seen_epochs[1][0]

    uninterrupted, interrupted = source(2), source(2)
    it = iter(interrupted)
    for _ in range(5):
        next(it)
    resumed = source(2)
    resumed.load_state_dict(interrupted.state_dict())
    reference = iter(uninterrupted)
    for _ in range(5):
        next(reference)
    for _ in range(6):
        assert all(torch.equal(a, b) for a, b in zip(next(iter_once(resumed)), next(reference)))


def iter_once(source):
    """The source's iterator, created once per source (a fresh iter() would also continue from its state)."""
    if not hasattr(source, "_test_iterator"):
        source._test_iterator = iter(source)
    return source._test_iterator


def test_packed_rows_give_each_example_its_own_loss(data_dir):
    """Packed into rows, each example attends only itself from position 0: the summed loss over all examples is
    the one of the examples padded one per row (a float64 model)."""
    split = SFTSplit(data_dir, "val")
    torch.manual_seed(0)
    model = GPT(CONFIG).double()
    padded = SFTBatches(split, 1, PAD_ID, 1, 0, seed=0, train=False, rows_per_step=1)
    packed = SFTBatches(split, 1, PAD_ID, 1, 0, seed=0, train=False, rows_per_step=1, packing_length=40)
    assert packed.n_rows < padded.n_rows == 6  # several examples per row
    rows = list(packed)
    assert all(len(batch) == 3 for batch in rows) and max(batch[2].max() for batch in rows) >= 1
    loss_padded, targets_padded = summed_loss(model, padded, len(padded), torch.device("cpu")).tolist()
    loss_packed, targets_packed = summed_loss(model, packed, len(packed), torch.device("cpu")).tolist()
    assert targets_packed == targets_padded == sum(int(split[i][1][1:].sum()) for i in range(6))
    assert loss_packed == pytest.approx(loss_padded, rel=1e-6)  # loss_sum takes the log-softmax in fp32


# ---- the script ------------------------------------------------------------------------------------------------


def run_script(script: str, args: dict) -> None:
    command = [sys.executable, str(ROOT / script)]
    for key, value in args.items():
        values = value if isinstance(value, list) else [value]
        command += [f"--{key}", *("none" if item is None else str(item) for item in values)]
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_step_loss_does_not_depend_on_micro_batches_or_processes(tmp_path, checkpoint_dir, data_dir):
    """Examples of different lengths, so the padding differs too: 1 x 4, 4 x 1 (accumulated), and 2 DDP
    processes x 2 give the same losses, gradient norms and weights."""
    runs = {"mbs4": dict(micro_batch_size=4), "mbs1": dict(micro_batch_size=1)}
    with launched(("finetune/sft.py", run_args(tmp_path / "ddp", checkpoint_dir, data_dir, max_steps=2, devices=2,
                                               strategy="ddp"))) as (ddp,):  # while the one-process runs train
        for name, overrides in runs.items():
            setup(**run_args(tmp_path / name, checkpoint_dir, data_dir, max_steps=2, **overrides))
        finish(ddp)

    reference = metrics(tmp_path / "mbs4")
    for name in ("mbs1", "ddp"):
        got = metrics(tmp_path / name)
        for step in (1, 2):
            for key in ("loss", "grad_norm"):
                assert got[step][key] == pytest.approx(reference[step][key], rel=1e-5), (name, step, key)
            assert got[step]["target_tokens"] == reference[step]["target_tokens"]
            assert got[step]["tokens"] == reference[step]["tokens"]  # padding is not counted
        assert got[0]["val_loss"] == pytest.approx(reference[0]["val_loss"], rel=1e-6)
        weights, expected = final_weights(tmp_path / name), final_weights(tmp_path / "mbs4")
        for key in expected:  # Adam's update of a near-zero gradient turns rounding into ~1e-5: updates are 1e-2
            torch.testing.assert_close(weights[key], expected[key], rtol=1e-4, atol=1e-4)


def test_lora_script_under_fsdp_resumes_exactly_and_equals_one_process(tmp_path, checkpoint_dir, data_dir):
    """finetune/lora.py as the README runs it, with its recipe's adapters (q and v, r 8, alpha 16, lr 2e-4), on 2
    FSDP processes: its sharded checkpoints hold the adapters only; resumed from step 2 it ends exactly where the
    uninterrupted run does; its final/ (merged) equals one process's."""
    args = {key: value for key, value in run_args(tmp_path / "fsdp", checkpoint_dir, data_dir).items()
            if key != "learning_rate"}
    args.update(devices=2, strategy="fsdp", lora_dropout=0.0)  # no dropout: 2 processes draw other masks than 1
    from torch.distributed.checkpoint import FileSystemReader

    with launched(("finetune/lora.py", args)) as (fsdp,):  # while one process trains the same adapters
        setup(**run_args(tmp_path / "one", checkpoint_dir, data_dir, lora_r=8, lora_alpha=16.0, lora_dropout=0.0,
                         lora_targets=["q", "v"], learning_rate=2e-4))
        finish(fsdp)
    hparams = json.loads((tmp_path / "fsdp" / "hyperparameters.json").read_text())
    assert (hparams["lora_r"], hparams["lora_alpha"], hparams["lora_targets"], hparams["learning_rate"]) == (
        8, 16.0, ["q", "v"], 2e-4)
    index = FileSystemReader(tmp_path / "fsdp" / "step-00000002").read_metadata().state_dict_metadata
    saved = [key.removeprefix("model.") for key in index if key.startswith("model.")]
    assert saved and all("lora_" in key for key in saved), saved
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "fsdp" / "step-00000002", resumed / "step-00000002")
    run_script("finetune/lora.py", {**args, "out_dir": resumed, "resume": "auto"})
    uninterrupted, again = final_weights(tmp_path / "fsdp"), final_weights(resumed)
    assert all(torch.equal(again[key], uninterrupted[key]) for key in uninterrupted)

    one = final_weights(tmp_path / "one")
    for key in one:
        torch.testing.assert_close(uninterrupted[key], one[key], rtol=1e-4, atol=1e-5)
    base = torch.load(checkpoint_dir / "lit_model.pth", weights_only=True)
    assert {key for key in base if not torch.equal(base[key], one[key])} == {
        f"transformer.h.{i}.attn.qkv.weight" for i in range(2)}


@pytest.mark.parametrize("lora", [False, True])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, checkpoint_dir, data_dir, lora):
    """Steps 3-4 resumed from step-2 equal the uninterrupted run's exactly (data order, dropout's RNG, optimizer);
    a LoRA checkpoint holds the adapters only, and LoRA's final/ is the merge of its saved adapters."""
    # LoRA with packed rows (3 rows of 64 tokens: an epoch per step), through the loop's forward with document ids
    extra = (dict(lora_r=4, lora_alpha=8.0, lora_dropout=0.1, lora_targets=["q", "k", "fc_1"], packing=True,
                  global_batch_size=2, micro_batch_size=1) if lora else {})
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    setup(**run_args(full, checkpoint_dir, data_dir, **extra))
    resumed.mkdir()
    shutil.copy(full / "step-00000002", resumed / "step-00000002")
    setup(**run_args(resumed, checkpoint_dir, data_dir, resume="auto", **extra))
    expected, got = metrics(full), metrics(resumed)
    assert [got[step]["loss"] for step in (3, 4)] == [expected[step]["loss"] for step in (3, 4)]
    weights, reference = final_weights(resumed), final_weights(full)
    assert weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in reference)

    saved = torch.load(full / "step-00000002", weights_only=True)
    final = full / "final"
    assert (final / "chat_template.jinja").read_text() == DATA_TEMPLATE
    assert saved["hparams"]["chat_template"] == DATA_TEMPLATE
    load_model(final)  # a normal checkpoint directory
    base = torch.load(checkpoint_dir / "lit_model.pth", weights_only=True)
    if not lora:
        assert saved["model"].keys() == base.keys()
        assert not (final / ADAPTERS_FILE).exists()
        return
    adapters = torch.load(final / ADAPTERS_FILE, weights_only=True)
    assert set(saved["model"]) == set(adapters) and len(adapters) == 2 * 3 * CONFIG.n_layer
    config = json.loads((final / CONFIG_FILE).read_text())
    assert (config["r"], config["alpha"], config["targets"]) == (4, 8.0, ["q", "k", "fc_1"])
    merged = merge_lora({**base, **adapters}, LoRAConfig(4, 8.0, 0.1, ("q", "k", "fc_1")), CONFIG)
    assert all(torch.equal(weights[k], merged[k]) for k in merged)
    changed = {k for k in base if not torch.equal(base[k], weights[k])}
    assert changed == {f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "mlp.fc_1")}


def test_final_generation_and_tokenizer_configs_follow_the_finetuned_template(tmp_path):
    """The initial checkpoint's generation_config.json and tokenizer_config.json (with another template in it) are
    not copied stale into final/: the end-of-turn id joins EOS, and the template is the one finetuned on."""
    from tests.test_tokenizer import train_chatml_tokenizer

    initial = tmp_path / "initial"
    initial.mkdir()
    train_chatml_tokenizer(initial)
    config = json.loads((initial / "tokenizer_config.json").read_text())
    (initial / "tokenizer_config.json").write_text(json.dumps(
        {**config, "eos_token": "<|endoftext|>", "chat_template": "{{ messages[0]['content'] }}"}))
    (initial / "generation_config.json").write_text(json.dumps({"eos_token_id": 0, "temperature": 0.7}))
    chatml = BUILTIN_TEMPLATES["chatml"]
    save_finetuned(GPT(CONFIG).state_dict(), tmp_path / "final", CONFIG, initial, chatml, lora=None)

    im_end = Tokenizer(initial).special_tokens["<|im_end|>"]
    generation = json.loads((tmp_path / "final" / "generation_config.json").read_text())
    assert generation == {"eos_token_id": [0, im_end], "bos_token_id": None, "temperature": 0.7}
    assert json.loads((tmp_path / "final" / "tokenizer_config.json").read_text())["chat_template"] == chatml
    assert (tmp_path / "final" / "chat_template.jinja").read_text() == chatml


def test_data_of_another_chat_template_is_refused_unless_overridden(tmp_path, checkpoint_dir, data_dir):
    own = tmp_path / "chat_checkpoint"
    shutil.copytree(checkpoint_dir, own)
    (own / "chat_template.jinja").write_text("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}")
    with pytest.raises(UserError, match="chat_template_override"):
        setup(**run_args(tmp_path / "refused", own, data_dir))
    setup(**run_args(tmp_path / "override", own, data_dir, max_steps=1, chat_template_override=True))
    assert (tmp_path / "override" / "final" / "chat_template.jinja").read_text() == DATA_TEMPLATE

    matching = tmp_path / "matching"
    shutil.copytree(checkpoint_dir, matching)
    (matching / "chat_template.jinja").write_text(DATA_TEMPLATE)
    setup(**run_args(tmp_path / "same", matching, data_dir, max_steps=1))


def test_data_that_does_not_fit_the_model_is_refused(tmp_path, checkpoint_dir):
    long_data = tmp_path / "long"
    sft_data.write_split(long_data, "train", [([1] * 80, [True] * 80)] * 4)
    sft_data.write_split(long_data, "val", [])
    sft_data.write_metadata(long_data, {"chat_template": DATA_TEMPLATE, "chat_template_name": "test",
                                        "chat_template_sha256": sft_data.template_sha256(DATA_TEMPLATE),
                                        "tokenizer": {"file": "tokenizer.json", "sha256": "0", "vocab_size": 250}})
    with pytest.raises(UserError, match="--max_seq_length 65"):
        setup(**run_args(tmp_path / "out", checkpoint_dir, long_data))
    small = write_data(tmp_path / "small", n_train=3)
    with pytest.raises(UserError, match="3 training examples make no step of --global_batch_size 4"):
        setup(**run_args(tmp_path / "out", checkpoint_dir, small))


@pytest.mark.parametrize("flags, message", [
    (dict(num_nodes=0), "--num_nodes must be at least 1, got 0"),
    (dict(precision="fp8"), "--precision 'fp8': expected one of bf16-mixed, bf16-true, 32-true"),
    (dict(devices="two"), "--devices must be auto or a number of at least 1, got 'two'"),
    (dict(beta2=1.0), r"--beta2 must be in \[0, 1\), got 1.0"),
])
def test_sft_runs_pretrainings_preflight_before_launching(tmp_path, checkpoint_dir, flags, message):
    """The checks SFT once lacked (--num_nodes, the choices of a call from Python), with pretraining's own."""
    data_dir = write_data(tmp_path / "data")
    with pytest.raises(UserError, match=f"^{message}"):
        setup(**{**run_args(tmp_path / "out", checkpoint_dir, data_dir), **flags})
    with pytest.raises(UserError, match=f"^{message}"):
        pretrain_setup(**{"train_data_dir": tmp_path, **flags})
    assert not (tmp_path / "out").exists()
