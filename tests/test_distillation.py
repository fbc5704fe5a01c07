"""distillation.py's loss against a hand-computed reference: forward, reverse and symmetric KL at temperatures, masked
positions left out, a teacher with a larger vocabulary read on the student's ids, and kd_alpha 1 = the data loss."""

import math
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

from distillation import IGNORE_INDEX, distillation_loss_sum, kd_divergence_sum
from test_pretrain import data_dir  # noqa: F401 (a fixture)


def softmax(values, temperature):
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


def reference_divergence(student, teacher, targets, temperature, divergence):
    """Plain Python over every unmasked position: the divergence between softmax(teacher / T) over the student's ids
    and softmax(student / T)."""
    total = 0.0
    for row in range(len(targets)):
        for position, target in enumerate(targets[row]):
            if target == IGNORE_INDEX:
                continue
            q = softmax(student[row][position], temperature)
            p = softmax(teacher[row][position][: len(q)], temperature)
            forward = sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
            reverse = sum(qi * (math.log(qi) - math.log(pi)) for pi, qi in zip(p, q))
            total += {"forward": forward, "reverse": reverse, "symmetric": (forward + reverse) / 2}[divergence]
    return total


@pytest.mark.parametrize("divergence", ["forward", "reverse", "symmetric"])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_the_divergence_equals_a_hand_computed_one_over_the_target_positions(divergence, temperature):
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 4, 6, generator=generator, dtype=torch.float64)
    teacher = torch.randn(2, 4, 8, generator=generator, dtype=torch.float64)  # 2 ids more than the student
    targets = torch.tensor([[1, IGNORE_INDEX, 3, 5], [IGNORE_INDEX, IGNORE_INDEX, 0, 2]])
    got = kd_divergence_sum(student, teacher, targets, temperature, divergence).item()
    expected = reference_divergence(student.tolist(), teacher.tolist(), targets.tolist(), temperature, divergence)
    assert got == pytest.approx(expected, rel=1e-6)


def test_the_loss_mixes_the_data_loss_and_t_squared_times_the_divergence():
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(2, 3, 5, generator=generator), torch.randn(2, 3, 5, generator=generator)
    targets = torch.tensor([[1, 2, IGNORE_INDEX], [0, 4, 3]])
    ce = F.cross_entropy(student.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    kd = kd_divergence_sum(student, teacher, targets, 2.0, "forward")
    got = distillation_loss_sum(student, teacher, targets, kd_alpha=0.25, temperature=2.0, divergence="forward")
    assert got.item() == pytest.approx((0.25 * ce + 0.75 * 4 * kd).item(), rel=1e-6)
    data_only = distillation_loss_sum(student, teacher * float("nan"), targets, 1.0, 2.0, "forward")
    assert torch.equal(data_only, ce)  # kd_alpha 1: exactly the data loss, the teacher unread
    same = kd_divergence_sum(student, student.clone(), targets, 1.0, "symmetric")
    assert same.item() == pytest.approx(0.0, abs=1e-6)  # a student equal to its teacher diverges by nothing


def micro_teacher(directory, vocab_size: int = 256):
    from checkpoint import save_model_dir
    from model import GPT, Config

    config = Config.from_name("micro", vocab_size=vocab_size)
    torch.manual_seed(11)
    save_model_dir(GPT(config), config, None, directory)
    return directory


def test_kd_alpha_one_trains_exactly_as_without_a_teacher_and_the_teacher_is_untouched(tmp_path, data_dir, capsys):
    from test_pretrain import final_weights, train_here

    teacher = micro_teacher(tmp_path / "teacher")
    before = torch.load(teacher / "lit_model.pth", weights_only=True)
    train_here(tmp_path / "plain", data_dir, max_steps=3)
    capsys.readouterr()
    train_here(tmp_path / "alpha1", data_dir, max_steps=3, teacher_checkpoint_dir=teacher, kd_alpha=1.0)
    assert f"--kd_alpha 1: the loss is the data loss alone; {teacher} is not loaded" in capsys.readouterr().out
    plain, alpha1 = final_weights(tmp_path / "plain"), final_weights(tmp_path / "alpha1")
    assert all(torch.equal(plain[name], alpha1[name]) for name in plain)
    train_here(tmp_path / "kd", data_dir, max_steps=3, teacher_checkpoint_dir=teacher, kd_alpha=0.5)
    distilled = final_weights(tmp_path / "kd")
    assert not all(torch.equal(plain[name], distilled[name]) for name in plain)  # the teacher changed the training
    after = torch.load(teacher / "lit_model.pth", weights_only=True)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_a_resumed_distillation_equals_an_uninterrupted_one(tmp_path, data_dir):
    from test_pretrain import final_weights, train_here

    teacher = micro_teacher(tmp_path / "teacher")
    settings = dict(teacher_checkpoint_dir=teacher, kd_alpha=0.3, kd_temperature=2.0, kd_divergence="symmetric")
    train_here(tmp_path / "straight", data_dir, max_steps=6, **settings)  # a checkpoint every 3 steps
    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "straight" / "step-00000003", tmp_path / "resumed" / "step-00000003")
    train_here(tmp_path / "resumed", data_dir, max_steps=6, resume="auto", **settings)
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)


def test_a_teacher_that_does_not_know_the_students_tokens_is_refused(tmp_path, data_dir):
    from test_pretrain import train_here
    from utils import UserError

    teacher = micro_teacher(tmp_path / "teacher", vocab_size=128)
    with pytest.raises(UserError, match="128 tokens, fewer than the student's 256"):
        train_here(tmp_path / "out", data_dir, max_steps=1, teacher_checkpoint_dir=teacher)
    with pytest.raises(UserError, match="--kd_alpha must be in"):
        train_here(tmp_path / "out", data_dir, max_steps=1, teacher_checkpoint_dir=teacher, kd_alpha=1.5)


def test_a_distillation_under_fsdp_shards_the_teacher_and_equals_one_process(tmp_path, data_dir):
    """2 FSDP processes on gloo: the teacher's Blocks are sharded as the student's (each process holds about half of
    its parameters), the losses and final weights are one process's, and the teacher's file is untouched."""
    from test_pretrain import DISTRIBUTED, final_weights, losses, run_args, run_script, train_here

    teacher = micro_teacher(tmp_path / "teacher")
    before = torch.load(teacher / "lit_model.pth", weights_only=True)
    settings = dict(DISTRIBUTED, teacher_checkpoint_dir=teacher, kd_alpha=0.3, kd_temperature=2.0, val_data_dir=None,
                    max_steps=3)
    train_here(tmp_path / "one", data_dir, **settings)
    output = run_script("pretrain/tinyllama.py", run_args(tmp_path / "fsdp", data_dir, devices=2, strategy="fsdp",
                                                          **settings))
    total, local = (int(number.replace(",", "")) for number in re.search(
        r"Teacher .*: ([\d,]+) parameters, ([\d,]+) of them on each process", output).groups())
    assert local < total * 0.6
    one, fsdp = losses(tmp_path / "one"), losses(tmp_path / "fsdp")
    assert sorted(fsdp) == [1, 2, 3] and all(fsdp[step] == pytest.approx(one[step], abs=1e-5) for step in one)
    weights, reference = final_weights(tmp_path / "fsdp"), final_weights(tmp_path / "one")
    for name in reference:
        torch.testing.assert_close(weights[name], reference[name], rtol=1e-4, atol=1e-5)
    after = torch.load(teacher / "lit_model.pth", weights_only=True)
    assert all(torch.equal(before[name], after[name]) for name in before)


# ---- finetune/sft.py with a teacher: the shared tiny trained checkpoint (4,096 ids) teaches a 250-id student ------


@pytest.fixture(scope="module")
def sft_setting(tmp_path_factory):
    """test_sft.py's student (random, 250 ids, no tokenizer) and SFT data: 16 training examples of 2-7 prompt tokens
    (no targets) and 2-11 response tokens (targets)."""
    from checkpoint import save_model_dir
    from model import GPT
    from test_sft import CONFIG, write_data

    root = tmp_path_factory.mktemp("sft_kd")
    torch.manual_seed(0)
    save_model_dir(GPT(CONFIG), CONFIG, None, root / "student")
    return root / "student", write_data(root / "data")


def sft_args(out_dir, student, data, **overrides):
    from test_sft import run_args

    return run_args(out_dir, student, data, **overrides)


def test_sft_with_a_teacher_at_kd_alpha_one_trains_exactly_as_without(tmp_path, sft_setting, trained):
    from finetune.sft import setup
    from test_pretrain import final_weights

    setup(**sft_args(tmp_path / "plain", *sft_setting, max_steps=2))
    setup(**sft_args(tmp_path / "alpha1", *sft_setting, max_steps=2, teacher_checkpoint_dir=trained.checkpoint_dir,
                     kd_alpha=1.0))
    plain, alpha1 = final_weights(tmp_path / "plain"), final_weights(tmp_path / "alpha1")
    assert all(torch.equal(plain[name], alpha1[name]) for name in plain)


def test_the_sft_kd_term_is_taken_on_the_assistant_tokens_only(tmp_path, sft_setting, trained):
    """kd_alpha 0 and one step over all 16 examples: the logged loss (of the initial weights) is T^2 x the forward
    KL summed over the response positions of each example run alone (no padding, no neighbours), in float64 over the
    student's 250 ids, divided by their count."""
    from checkpoint import load_model
    from finetune.sft import setup
    from sft_data import SFTSplit
    from test_sft import metrics

    student_dir, data = sft_setting
    temperature = 2.0
    setup(**sft_args(tmp_path / "kd", student_dir, data, max_steps=1, global_batch_size=16, micro_batch_size=4,
                     teacher_checkpoint_dir=trained.checkpoint_dir, kd_alpha=0.0, kd_temperature=temperature))
    student, teacher = load_model(student_dir).double(), load_model(trained.checkpoint_dir).double()
    vocab = student.config.vocab_size
    total, count = 0.0, 0
    split = SFTSplit(data, "train")
    with torch.no_grad():
        for index in range(len(split)):
            ids, mask = (torch.as_tensor(part) for part in split[index])
            targets = mask[1:].bool()  # the positions that predict a response token
            q = F.softmax(student(ids[None, :-1])[0, targets, :vocab] / temperature, dim=-1)
            p = F.softmax(teacher(ids[None, :-1])[0, targets, :vocab] / temperature, dim=-1)
            total += (p * (p.log() - q.log())).sum().item()
            count += int(targets.sum())
    assert count < sum(len(split[index][0]) - 1 for index in range(len(split)))  # prompts are left out
    assert metrics(tmp_path / "kd")[1]["loss"] == pytest.approx(temperature ** 2 * total / count, rel=1e-5)
