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
against CodeLlama's 32016) is read on the student's ids only: its distribution renormalised over them.
"""

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Divergence = Literal["forward", "reverse", "symmetric"]
IGNORE_INDEX = -100


def kd_divergence_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      temperature: float, divergence: Divergence) -> torch.Tensor:
    """The divergence between the teacher's and the student's distributions at `temperature`, summed over the target
    positions (targets != IGNORE_INDEX). student_logits (B, T, V_s), teacher_logits (B, T, V_t >= V_s), targets (B, T).
    Computed in fp32 (bf16 log-probabilities keep about 3 significant digits)."""
    vocab = student_logits.size(-1)
    mask = targets != IGNORE_INDEX
    student = F.log_softmax(student_logits[mask].float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits[mask][..., :vocab].float() / temperature, dim=-1)
    forward = (teacher.exp() * (teacher - student)).sum()
    if divergence == "forward":
        return forward
    reverse = (student.exp() * (student - teacher)).sum()
    return reverse if divergence == "reverse" else (forward + reverse) / 2


def distillation_loss_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                          kd_alpha: float, temperature: float, divergence: Divergence) -> torch.Tensor:
    """kd_alpha x the summed cross-entropy + (1 - kd_alpha) x T^2 x the summed divergence, over the target
    positions; with kd_alpha 1 exactly the data loss (the teacher's logits unused)."""
    ce = F.cross_entropy(student_logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                         reduction="sum")
    if kd_alpha == 1:
        return ce
    kd = kd_divergence_sum(student_logits, teacher_logits, targets, temperature, divergence)
    return kd_alpha * ce + (1 - kd_alpha) * temperature ** 2 * kd


@dataclass(frozen=True)
class Teacher:
    """A frozen teacher and how its distribution enters the loss (see the module docstring)."""

    model: torch.nn.Module
    kd_alpha: float
    temperature: float
    divergence: Divergence

    def loss_sum(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 targets: torch.Tensor) -> torch.Tensor:
        return distillation_loss_sum(student_logits, teacher_logits, targets, self.kd_alpha, self.temperature,
                                     self.divergence)


def check_kd_settings(kd_alpha: float, temperature: float) -> None:
    """ValueError naming the flag: kd_alpha in [0, 1], a positive temperature."""
    if not 0 <= kd_alpha <= 1:
        raise ValueError(f"--kd_alpha must be in [0, 1] (the data loss's weight), got {kd_alpha}")
    if not temperature > 0:
        raise ValueError(f"--kd_temperature must be positive, got {temperature}")
