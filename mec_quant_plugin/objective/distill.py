"""Logit distillation from the frozen full-precision model (Hinton et al. 2015): the standard
strong baseline of quantization-aware training, and a partner of the coding-length term."""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """`T^2 * KL(softmax(teacher/T) || softmax(student/T))`, averaged over samples (token rows for
    sequences), in fp32; the teacher gets no gradient.

    Example:
        >>> distillation_loss(torch.zeros(4, 10), torch.zeros(4, 10)).item()
        0.0

    Raises:
        ValueError: shapes differ, or temperature <= 0.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape.")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    s = student_logits.float().flatten(0, -2) / temperature
    t = teacher_logits.detach().float().flatten(0, -2) / temperature
    return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean") * temperature**2
