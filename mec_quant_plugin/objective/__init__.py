"""The coding-length objective of MEC-Quant: pure tensor functions plus small modules.

- `coding_length_loss` / `exact_coding_length`: MEC's term (Taylor series, even order) and its
  exact fp64 log det;
- `mixture_coding_length_loss`: the mixture-of-experts reformulation (magnitude / gate / features);
- `adaptive_lambda`, `center_features`: conditioning that keeps the series convergent;
- `FeatureCapture`: forward hooks recording the representation (head input, block outputs);
- `LayerwiseCodingLength`, `rate_reduction_loss`, `mutual_information_loss`, `distillation_loss`:
  the candidate terms of MEC-Quant v2 (per-layer coding length, label-aware rate reduction,
  mutual information with the teacher's block outputs, logit distillation);
- `MECRegularizer`, `make_teacher`: every term as one module driven by the training step;
- `TermStats`, `LayerwiseStats`, `MECStats`: the typed statistics of a term and of the
  regularizer's last call;
- `gather_rows`: gradient-preserving all-gather for data parallelism.
"""

from .capture import FeatureCapture, find_blocks, resolve_taps
from .class_coding import rate_reduction_loss
from .coding_length import coding_length_loss, exact_coding_length
from .conditioning import adaptive_lambda, center_features, normalize_rows, warmup_lambda_scale
from .distill import distillation_loss
from .distributed import gather_rows
from .layerwise import LayerwiseCodingLength
from .mixture import mixture_coding_length_loss
from .mutual_information import mutual_information, mutual_information_loss
from .regularizer import MECRegularizer, make_teacher
from .stats import LayerwiseStats, MECStats, TapStats, TermStats

__all__ = [
    "FeatureCapture",
    "LayerwiseCodingLength",
    "LayerwiseStats",
    "MECRegularizer",
    "MECStats",
    "TapStats",
    "TermStats",
    "adaptive_lambda",
    "center_features",
    "coding_length_loss",
    "distillation_loss",
    "exact_coding_length",
    "find_blocks",
    "gather_rows",
    "make_teacher",
    "mixture_coding_length_loss",
    "mutual_information",
    "mutual_information_loss",
    "normalize_rows",
    "rate_reduction_loss",
    "resolve_taps",
    "warmup_lambda_scale",
]
