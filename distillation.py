"""Knowledge distillation's loss: the student's cross-entropy on the data mixed with a divergence from a frozen
teacher's distribution, over the same target positions (the SFT masks too).

    loss = kd_alpha * CE(student, data) + (1 - kd_alpha) * T^2 * D(teacher_T, student_T)

where p_T = softmax(logits / T) and D is one of
- forward: KL(teacher || student) = sum p_teacher (log p_teacher - log p_student): the student covers every mode of
  the teacher (Hinton et al.'s choice, and what raises a draft model's acceptance: DistillSpec);
- reverse: KL(student || teacher): the student concentrates on the teacher's largest modes (MiniLLM);
- symmetric: half of each.
T^2 keeps the gradients' scale independent of T (Hinton et al. 2015). Like the data loss, the sums run over the
target positions (targets != -100) and are divided by the step's target count by the training loop.

Teacher and student share a tokenizer. A teacher whose vocabulary extends the student's (AMD-Llama-135m's 32000 ids
against CodeLlama's 32016) is read on the student's ids only: its distribution renormalised over them. The divergence
runs over the student's `vocab_size` ids, not the padding rows of its embedding (the data loss's softmax keeps them,
as Hugging Face's does).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from checkpoint import load_model, refuse_quantized
from model import Config
from tokenizer import TOKENIZER_PROBE, Tokenizer, has_tokenizer
from utils import UserError

Divergence = Literal["forward", "reverse", "symmetric"]
IGNORE_INDEX = -100


def kd_divergence_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      temperature: float, divergence: Divergence, vocab_size: Optional[int] = None) -> torch.Tensor:
    """The divergence between the teacher's and the student's distributions at `temperature` over the ids below
    `vocab_size` (the student's vocabulary; None: all of student_logits), summed over the target positions
    (targets != IGNORE_INDEX). student_logits (B, T, V_s), teacher_logits (B, T, V_t >= vocab_size), targets (B, T).
    Computed in fp32 (bf16 log-probabilities keep about 3 significant digits)."""
    vocab = vocab_size or student_logits.size(-1)
    mask = targets != IGNORE_INDEX
    # the rows of a padded embedding (model.Config.padded_vocab_size) are no token of either model: left out
    student = F.log_softmax(student_logits[mask][..., :vocab].float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits[mask][..., :vocab].float() / temperature, dim=-1)
    forward = (teacher.exp() * (teacher - student)).sum()
    if divergence == "forward":
        return forward
    reverse = (student.exp() * (student - teacher)).sum()
    return reverse if divergence == "reverse" else (forward + reverse) / 2


def distillation_loss_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                          kd_alpha: float, temperature: float, divergence: Divergence,
                          vocab_size: Optional[int] = None) -> torch.Tensor:
    """kd_alpha x the summed cross-entropy + (1 - kd_alpha) x T^2 x the summed divergence, over the target
    positions; with kd_alpha 1 exactly the data loss (the teacher's logits unused)."""
    ce = F.cross_entropy(student_logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                         reduction="sum")
    if kd_alpha == 1:
        return ce
    kd = kd_divergence_sum(student_logits, teacher_logits, targets, temperature, divergence, vocab_size)
    return kd_alpha * ce + (1 - kd_alpha) * temperature ** 2 * kd


@dataclass(frozen=True)
class Teacher:
    """A frozen teacher and how its distribution enters the loss (see the module docstring)."""

    model: torch.nn.Module
    kd_alpha: float
    temperature: float
    divergence: Divergence
    vocab_size: int  # the student's vocabulary, without the padding rows of its embedding

    def loss_sum(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 targets: torch.Tensor) -> torch.Tensor:
        return distillation_loss_sum(student_logits, teacher_logits, targets, self.kd_alpha, self.temperature,
                                     self.divergence, self.vocab_size)


def check_teacher_flags(teacher_checkpoint_dir: Optional[Path], kd_alpha: float, temperature: float) -> None:
    """What a recipe checks before it launches processes: with a teacher, its directory exists, kd_alpha is in
    [0, 1] and the temperature positive (UserError or FileNotFoundError naming the flag)."""
    if teacher_checkpoint_dir is None:
        return
    if not 0 <= kd_alpha <= 1:
        raise UserError(f"--kd_alpha must be in [0, 1] (the data loss's weight), got {kd_alpha}")
    if not temperature > 0:
        raise UserError(f"--kd_temperature must be positive, got {temperature}")
    if not Path(teacher_checkpoint_dir).is_dir():
        raise FileNotFoundError(f"--teacher_checkpoint_dir {teacher_checkpoint_dir} does not exist")


def build_teacher(fabric, teacher_checkpoint_dir: Optional[Path], kd_alpha: float, temperature: float,
                  divergence: Divergence, config: Config, seq_len: int,
                  tokenizer_dir: Optional[Path]) -> Optional[Teacher]:
    """A recipe's Teacher (`load_teacher`); None without a teacher and at kd_alpha 1, where its logits would not enter
    the loss: it is then neither loaded nor run (the same training, without a teacher forward per micro-batch)."""
    if teacher_checkpoint_dir is None:
        return None
    if kd_alpha == 1:
        fabric.print(f"--kd_alpha 1: the loss is the data loss alone; {teacher_checkpoint_dir} is not loaded")
        return None
    return Teacher(load_teacher(fabric, Path(teacher_checkpoint_dir), config, seq_len, tokenizer_dir), kd_alpha,
                   temperature, divergence, config.vocab_size)


def load_teacher(fabric, teacher_dir: Path, config: Config, seq_len: int,
                 tokenizer_dir: Optional[Path]) -> torch.nn.Module:
    """The teacher of a student of `config` trained on sequences of `seq_len`, frozen (no gradients, eval mode) in
    the training precision's dtype on this process's device. Under FSDP (Fabric's ModelParallelStrategy) Fabric sets
    it up as the student, through the same parallelize function: every Block sharded over the processes and gathered
    for its forward only, so a large teacher fits beside the student. Under DDP it is whole on every process (DDP
    wraps only a module with something to train). Refused: a quantized teacher, one whose vocabulary does not cover
    the student's, one that takes shorter sequences, one whose tokenizer is not the student's (`tokenizer_dir`'s)."""
    from lightning_fabric.strategies import ModelParallelStrategy

    refuse_quantized(teacher_dir, "--teacher_checkpoint_dir", "distillation")
    precision = fabric.strategy.precision.precision
    teacher = load_model(teacher_dir, device=fabric.device,
                         dtype=torch.float32 if precision == "32-true" else torch.bfloat16).requires_grad_(False)
    if teacher.config.vocab_size < config.vocab_size:
        raise UserError(f"--teacher_checkpoint_dir {teacher_dir} has {teacher.config.vocab_size} tokens, fewer than "
                        f"the student's {config.vocab_size}: a teacher must know every token of the student")
    if teacher.config.block_size < seq_len:
        raise UserError(f"--teacher_checkpoint_dir {teacher_dir} takes sequences of {teacher.config.block_size} "
                        f"tokens at most, fewer than the student's {seq_len}")
    if tokenizer_dir is not None and has_tokenizer(tokenizer_dir) and has_tokenizer(teacher_dir):
        ours, theirs = Tokenizer(tokenizer_dir), Tokenizer(teacher_dir)
        if ours.encode(TOKENIZER_PROBE) != theirs.encode(TOKENIZER_PROBE) or ours.eos_id != theirs.eos_id:
            raise UserError(f"--teacher_checkpoint_dir {teacher_dir}'s tokenizer is not the student's "
                            f"({tokenizer_dir}): they encode a probe text differently; distillation compares ids")
    total = sum(param.numel() for param in teacher.parameters())
    if isinstance(fabric.strategy, ModelParallelStrategy):
        teacher = fabric.setup_module(teacher)
    # a sharded parameter is a DTensor: this process holds its local shard
    local = sum(getattr(param, "to_local", lambda: param)().numel() for param in teacher.parameters())
    fabric.print(f"Teacher {teacher_dir}: {total:,} parameters, {local:,} of them on each process, {precision}")
    return teacher.eval()
