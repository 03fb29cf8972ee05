"""Label-aware coding length (MCR^2, Yu et al. 2020): expand the whole, compress each class.

A self coding-length term on the head features fights the cross-entropy, which pulls each class
toward its mean (about classes-1 directions). The rate reduction
`Delta R = R(Z) - sum_j (m_j / m) R(Z_j)` instead rewards a representation whose classes are each
compact but together span many directions: the mixture coding length with the labels as the
routing of samples to experts. `R(Z) = 1/2 logdet(I + d/(m eps^2) Z^T Z)` on L2-normalized rows,
exact (fp64) in the smaller of the m x m / d x d forms.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .conditioning import center_features, normalize_rows


def _rate(z: Tensor, eps2: float) -> Tensor:
    m, d = z.shape
    g = z.T @ z if d <= m else z @ z.T
    eye = torch.eye(g.shape[0], dtype=torch.float64, device=z.device)
    return 0.5 * torch.linalg.slogdet(eye + (d / (m * eps2)) * g.double()).logabsdet.float()


def rate_reduction_loss(features: Tensor, labels: Tensor, eps2: float = 0.5, center: bool = True) -> Tensor:
    """`-(R(Z) - sum_j m_j/m R(Z_j)) / d`: minimized, it maximizes the rate reduction per feature.

    Classes with fewer than 2 samples in the batch are left out of the compression sum.

    Example:
        >>> z, y = torch.randn(64, 16), torch.arange(64) % 4
        >>> rate_reduction_loss(z, y).shape
        torch.Size([])

    Raises:
        ValueError: features not (m, d), or labels not (m,).
    """
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"need (m, d) features and (m,) labels, got {tuple(features.shape)} and {tuple(labels.shape)}.")
    with torch.autocast(features.device.type, enabled=False):
        z = features.float()
        z = normalize_rows(center_features(z) if center else z)
        m, d = z.shape
        whole = _rate(z, eps2)
        parts = torch.zeros((), device=z.device)
        for label in labels.unique():
            zj = z[labels == label]
            if zj.shape[0] >= 2:
                parts = parts + zj.shape[0] / m * _rate(zj, eps2)
    return -(whole - parts) / d
