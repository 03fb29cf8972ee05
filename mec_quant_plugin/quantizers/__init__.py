"""LSQ / LSQ+ fake quantizers with learnable step sizes, written by hand.

Why not torchao's `FakeQuantizer`: int1 is broken in torchao 0.18 (symmetric int1 zeroes every
weight), asymmetric int2 weight fake-quant is numerically wrong, and it only handles 2-D weights
(no Conv2d). These quantizers cover 1..8 bits for weights (per channel or per group) and
activations (per tensor, unsigned or signed with a learnable offset). The math runs in fp32 with
autocast disabled and casts back to the input dtype.

- `weight.py`: `WeightFakeQuantizer` and its export, `to_affine()` -> `AffineWeight`;
- `activation.py`: `ActivationFakeQuantizer` (calibrated on the first usable batch, averaged across ranks);
- `autograd.py`: the LSQ / binary autograd Functions (gradients and memory);
- `numerics.py`: fp32 under autocast, positive steps, finite weights and usable calibration batches.
"""

from .activation import ActivationFakeQuantizer
from .weight import AffineWeight, WeightFakeQuantizer

__all__ = ["ActivationFakeQuantizer", "AffineWeight", "WeightFakeQuantizer"]
