"""Float64 references of the coding length and tiny offline models for the objective tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def ref_normalize(z: Tensor) -> Tensor:
    z = z.double()
    norms = z.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, z / norms.clamp_min(1e-300), torch.zeros_like(z))


def ref_matrix(z1: Tensor, z2: Tensor | None, lam: float) -> Tensor:
    a = ref_normalize(z1)
    b = a if z2 is None else ref_normalize(z2)
    return lam * a @ b.T  # always the m x m form, plain matrix powers


def ref_series(z1: Tensor, z2: Tensor | None, lam: float, order: int) -> Tensor:
    c = ref_matrix(z1, z2, lam)
    return sum((-1) ** (k + 1) * torch.trace(torch.linalg.matrix_power(c, k)) / k for k in range(1, order + 1))


def ref_logdet(z1: Tensor, z2: Tensor | None, lam: float) -> Tensor:
    c = ref_matrix(z1, z2, lam)
    return torch.linalg.slogdet(torch.eye(c.shape[0], dtype=c.dtype) + c).logabsdet


def ref_loss(z1: Tensor, z2: Tensor | None, lam: float, order: int | None) -> Tensor:
    m = z1.shape[0]
    s = ref_logdet(z1, z2, lam) if order is None else ref_series(z1, z2, lam, order)
    return -s / (m * lam)


def tiny_vit() -> tuple[nn.Module, dict]:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=32, num_labels=3)
    return ViTForImageClassification(cfg), {"pixel_values": torch.randn(4, 3, 16, 16), "labels": torch.tensor([0, 1, 2, 0])}


def tiny_resnet() -> tuple[nn.Module, dict]:
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)
    return ResNetForImageClassification(cfg), {"pixel_values": torch.randn(4, 3, 16, 16), "labels": torch.tensor([0, 1, 2, 0])}


def _token_batch(n: int = 3, t: int = 6) -> dict:
    ids = torch.randint(0, 64, (n, t))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # right padding
    mask[2, :2] = 0  # left padding
    return {"input_ids": ids, "attention_mask": mask}


def tiny_llama() -> tuple[nn.Module, dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    batch = _token_batch()
    return LlamaForCausalLM(cfg), {**batch, "labels": batch["input_ids"]}


def tiny_bert() -> tuple[nn.Module, dict]:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(cfg), {**_token_batch(), "labels": torch.tensor([0, 2, 1])}


TINY_MODELS = {"vit": tiny_vit, "resnet": tiny_resnet, "llama": tiny_llama, "bert": tiny_bert}


class TinyMLP(nn.Module):
    """Linear-ReLU-Linear-ReLU-Linear classifier: the last Linear is the head."""

    def __init__(self, d_in: int = 6, hidden: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))
