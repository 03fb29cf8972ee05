"""The mutual information of MEC-Quant v2's candidate (c): `I = R(Zq) + R(Zfp) - R([Zq|Zfp])` on
standardized features. Its bounds, its invariances, the gradient reaching only the student."""

from __future__ import annotations

import math

import pytest
import torch

from mec_quant_plugin.objective import mutual_information, mutual_information_loss
from mec_quant_plugin.objective.mutual_information import MI_EPS2, mutual_information_lower_bound


def _views(m: int = 512, d: int = 8, noise: float = 0.5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(m, d, generator=gen) @ torch.randn(d, d, generator=gen)
    return teacher + noise * torch.randn(m, d, generator=gen), teacher


def _half_logdet(z: torch.Tensor) -> float:
    z = (z - z.mean(0)) / z.std(0, unbiased=False)
    return 0.5 * float(torch.logdet(torch.eye(z.shape[1], dtype=torch.float64) + (z.T @ z).double() / z.shape[0] / MI_EPS2))


def test_it_is_the_sum_of_the_two_coding_lengths_minus_the_joint_one():
    student, teacher = _views()
    expected = _half_logdet(student) + _half_logdet(teacher) - _half_logdet(torch.cat([student, teacher], 1))
    assert float(mutual_information(student, teacher)) == pytest.approx(expected, rel=1e-4)


def test_bounds_and_order_more_noise_less_information():
    values = [float(mutual_information(*_views(noise=noise))) for noise in (0.1, 0.5, 2.0)]
    independent = float(mutual_information(torch.randn(512, 8), torch.randn(512, 8)))
    student, _ = _views(noise=0.1)
    assert values[0] > values[1] > values[2] > independent >= 0
    assert independent < 0.05 * values[2]
    assert values[0] <= _half_logdet(student) + 1e-6  # I <= R(Zq)
    same = torch.randn(512, 8)
    # identical views: R(Z) + R(Z) - R([Z|Z]) = logdet(I + aC) - 1/2 logdet(I + 2aC) per eigenvalue
    assert float(mutual_information_loss(same, same)) >= mutual_information_lower_bound()


def test_invariant_to_rescaling_and_shifting_either_view():
    student, teacher = _views()
    scale, shift = torch.rand(8) * 5 + 0.1, torch.randn(8) * 3
    torch.testing.assert_close(mutual_information(student * scale + shift, teacher - shift),
                               mutual_information(student, teacher), rtol=1e-4, atol=1e-6)


def test_identical_views_reach_the_closed_form():
    z = torch.randn(4096, 4)
    alpha = 1 / MI_EPS2
    per_dim = math.log1p(alpha) - 0.5 * math.log1p(2 * alpha)  # C ~ I for independent unit columns
    assert float(mutual_information_loss(z, z)) == pytest.approx(-per_dim, rel=0.02)


def test_gradient_reaches_the_student_only_and_raises_the_information():
    student, teacher = _views(noise=1.0)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    loss = mutual_information_loss(student, teacher)
    loss.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    with torch.no_grad():
        moved = student - 0.5 * student.grad / student.grad.norm() * student.norm()
    assert float(mutual_information_loss(moved, teacher)) < float(loss.detach())


@pytest.mark.parametrize("student, teacher, match", [
    (torch.randn(8, 4), torch.randn(9, 4), "same rows"),
    (torch.randn(1, 4), torch.randn(1, 4), "at least 2 rows"),
    (torch.randn(8, 4, 2), torch.randn(8, 4, 2), r"\(m, d\) views"),
])
def test_bad_views_are_clear_errors(student, teacher, match):
    with pytest.raises(ValueError, match=match):
        mutual_information(student, teacher)
