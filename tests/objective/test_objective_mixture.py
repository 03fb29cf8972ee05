"""The mixture-of-experts reformulation: K = 1 equalities, routings, gate gradients."""

from __future__ import annotations

import pytest
import torch
from objective_helpers import ref_loss, ref_series
from torch import nn

from mec_quant_plugin.objective import coding_length_loss, mixture_coding_length_loss

LAMBDA_SETTINGS = [dict(eps2=2.0), dict(eps2=2.0, target_radius=0.5), dict(eps2=2.0, order=None)]


@pytest.mark.parametrize("routing", ["magnitude", "gate", "features"])
@pytest.mark.parametrize("view", ["self", "teacher"])
@pytest.mark.parametrize("setting", LAMBDA_SETTINGS, ids=["fixed", "adaptive", "exact"])
def test_one_expert_equals_the_plain_term_exactly(routing, view, setting):
    z1 = torch.randn(20, 12)
    z2 = None if view == "self" else torch.randn(20, 12)
    gate = nn.Linear(12, 1) if routing == "gate" else None
    plain, plain_stats = coding_length_loss(z1, z2, **setting)
    mixed, stats = mixture_coding_length_loss(z1, z2, experts=1, routing=routing, gate=gate, **setting)
    assert torch.equal(mixed, plain)  # bit for bit: the same arithmetic
    assert torch.equal(stats.coding_length, plain_stats.coding_length)
    assert float(stats.expert_share[0]) == 1.0


@pytest.mark.parametrize("head_rows", [30, 33])  # 40 rows: equal shares (batched); 43: unequal (looped)
@pytest.mark.parametrize("view", ["self", "teacher"])
def test_magnitude_routing_codes_quantiles_separately(head_rows, view):
    head = torch.randn(head_rows, 8)
    tail = 20 * torch.randn(10, 8)
    z = torch.cat([tail[:5], head, tail[5:]])
    z2 = None if view == "self" else z + torch.randn_like(z)
    m = z.shape[0]
    loss, stats = mixture_coding_length_loss(z, z2, eps2=1.0, experts=4, routing="magnitude")
    # The routing known by construction, not re-derived from the norms of all rows: the 10 tail
    # rows (20x the norm) are coded together as the last expert; the head rows fill the first
    # three, split at their own norm quantiles. Expert sizes are those of tensor_split(m, 4).
    sizes = [len(part) for part in torch.arange(m).tensor_split(4)]
    assert sizes[-1] == 10
    tail_rows = torch.tensor([*range(5), *range(5 + head_rows, m)])
    head_by_norm = torch.arange(5, 5 + head_rows)[head.norm(dim=1).argsort()]
    expected = 0
    for rows in [*head_by_norm.split(sizes[:3]), tail_rows]:
        rows = rows.sort().values
        m_e = rows.numel()
        lam_e = 8 / (m_e * 1.0)  # lambda_e = d / (m_e eps2)
        expected = expected + m_e / m * ref_loss(z[rows], None if z2 is None else z2[rows], lam_e, 4)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)  # fp32 vs fp64, near 0
    assert [float(share) for share in stats.expert_share] == pytest.approx([n / m for n in sizes])


@pytest.mark.parametrize("d", [12, 13])  # 13 features: unequal groups (looped)
def test_feature_split_is_the_block_diagonal_sum(d):
    z = torch.randn(16, d)
    loss, stats = mixture_coding_length_loss(z, eps2=0.5 * d, experts=3, routing="features")
    expected_loss, expected_cl = 0, 0
    for cols in torch.arange(d).tensor_split(3):
        d_e = cols.numel()
        lam_e = d_e / (16 * 0.5 * d_e)  # same eps^2 per dimension: eps2_e = eps2 * d_e / d
        expected_loss = expected_loss + d_e / d * ref_loss(z[:, cols], None, lam_e, 4)
        expected_cl = expected_cl + (16 + d_e) / 2 * ref_series(z[:, cols], None, lam_e, 4) / 16
    torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(stats.coding_length.double(), expected_cl, rtol=1e-5, atol=0)


def test_gate_parameters_get_gradients_and_balance_is_reported():
    z = torch.randn(64, 10, requires_grad=True)
    gate = nn.Linear(10, 4)
    loss, stats = mixture_coding_length_loss(z, eps2=1.0, experts=4, routing="gate", gate=gate, target_radius=0.5)
    loss.backward()
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0
    assert gate.bias.grad.abs().sum() > 0
    assert torch.isfinite(z.grad).all()
    # shares = the fraction f_e of rows whose top gate probability is expert e; balance = the
    # Switch-Transformer load-balancing term K * sum_e f_e * mean_rows(p_e) - 1, added with its weight
    with torch.no_grad():
        probs = gate(z.detach()).softmax(dim=-1)
    fraction = torch.bincount(probs.argmax(dim=-1), minlength=4).float() / 64
    shares = torch.stack([stats.expert_share[e] for e in range(4)])
    torch.testing.assert_close(shares, fraction)
    torch.testing.assert_close(stats.balance, 4 * (fraction * probs.mean(dim=0)).sum() - 1)
    unweighted, _ = mixture_coding_length_loss(z, eps2=1.0, experts=4, routing="gate", gate=gate, target_radius=0.5,
                                               balance_weight=0.0)
    torch.testing.assert_close(loss - unweighted, 0.01 * stats.balance)


def test_mixture_arguments_are_validated():
    z = torch.randn(8, 4)
    with pytest.raises(ValueError, match="routing"):
        mixture_coding_length_loss(z, eps2=1.0, experts=2, routing="random")
    with pytest.raises(ValueError, match="needs a gate"):
        mixture_coding_length_loss(z, eps2=1.0, experts=2, routing="gate")
    with pytest.raises(ValueError, match="2 rows per expert"):
        mixture_coding_length_loss(z, eps2=1.0, experts=5, routing="magnitude")
    with pytest.raises(ValueError, match="d >= experts"):
        mixture_coding_length_loss(z, eps2=1.0, experts=5, routing="features")
    with pytest.raises(ValueError, match="gate output"):
        mixture_coding_length_loss(z, eps2=1.0, experts=2, routing="gate", gate=nn.Linear(4, 3))
