"""Does quantization collapse the representation, and where? Per-layer statistics of what each
low-bit layer computes on (its input codes) and of its weight codes.

For every inner fake-quantized layer, on a fixed set of images:
- `eff_rank_float`: effective rank (Roy & Vetterli 2007: exp of the entropy of the normalized
  singular values) of the layer's FLOAT input, spatial positions as rows, channels as features,
  rows centered;
- `eff_rank_quant`: the same for the QUANTIZED input (what the layer multiplies);
- `code_entropy`: mean over channels of the entropy (bits) of the channel's activation codes
  (at most `bits`);
- `dead_channels`: share of channels whose codes never change on these images;
- `unused_levels`: share of the 2^bits levels a channel never uses, averaged over channels;
- `weight_code_entropy`: entropy (bits) of the layer's weight codes, per output filter, averaged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mec_quant_plugin.objective.layerwise import low_bit_layers


def effective_rank(rows: Tensor) -> float:
    """exp(H(p)) with p the normalized singular values of the centered rows (1 = collapsed)."""
    rows = rows.double()
    s = torch.linalg.svdvals(rows - rows.mean(0))
    p = s / s.sum().clamp_min(1e-300)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def _entropy_bits(codes: Tensor) -> float:
    _, counts = codes.unique(return_counts=True)
    p = counts.double() / counts.sum()
    return float(-(p * p.log2()).sum())


def _activation_codes(quantizer: nn.Module, out: Tensor) -> Tensor:
    qmin, qmax = quantizer.qrange
    step = quantizer.scale.detach().abs().clamp_min(1e-8)
    offset = quantizer.offset.detach() if bool(quantizer.signed) else 0.0
    return torch.round((out - offset) / step).clamp(qmin, qmax)


@torch.no_grad()
def layer_statistics(model: nn.Module, images: Tensor, max_rows: int = 4096) -> list[dict]:
    """The statistics above for each low-bit layer of a PREPARED (fake-quantized) model, on `images`
    (already normalized); eval mode (BatchNorm running statistics)."""
    model.eval()
    seen: dict[str, tuple[Tensor, Tensor]] = {}
    handles = []
    layers = [(n, m) for n, m in low_bit_layers(model) if m.activation_fake_quantizer is not None]
    for name, mod in layers:
        def hook(q, args, out, name=name):
            seen[name] = (args[0], out)
        handles.append(mod.activation_fake_quantizer.register_forward_hook(hook))
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()
    gen = torch.Generator().manual_seed(0)
    report = []
    for name, mod in layers:
        x, xq = seen[name]
        to_rows = (lambda t: t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])) if x.dim() == 4 else (lambda t: t.reshape(-1, t.shape[-1]))
        rows_f, rows_q = to_rows(x), to_rows(xq)
        keep = torch.randperm(rows_f.shape[0], generator=gen)[:max_rows]
        q = mod.activation_fake_quantizer
        codes = _activation_codes(q, rows_q)
        levels = 2 ** q.bits
        per_channel = [codes[:, c] for c in range(codes.shape[1])]
        wq = mod.weight_fake_quantizer
        w_codes = wq.to_affine(mod.weight).codes if wq is not None and hasattr(wq, "to_affine") else None
        report.append({
            "layer": name,
            "channels": codes.shape[1],
            "eff_rank_float": round(effective_rank(rows_f[keep]), 3),
            "eff_rank_quant": round(effective_rank(rows_q[keep]), 3),
            "code_entropy": round(sum(_entropy_bits(c) for c in per_channel) / len(per_channel), 4),
            "dead_channels": round(sum(int(c.unique().numel() == 1) for c in per_channel) / len(per_channel), 4),
            "unused_levels": round(sum(1 - c.unique().numel() / levels for c in per_channel) / len(per_channel), 4),
            "weight_code_entropy": None if w_codes is None else round(
                sum(_entropy_bits(r) for r in w_codes.reshape(w_codes.shape[0], -1)) / w_codes.shape[0], 4),
        })
    return report
