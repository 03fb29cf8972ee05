"""Tiny Hugging Face models built from configs, with a matching input batch (no downloads)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def tiny_llama() -> tuple[nn.Module, dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    ids = torch.randint(0, 64, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return LlamaForCausalLM(cfg), {"input_ids": ids, "attention_mask": mask, "labels": ids}


def tiny_gpt2() -> tuple[nn.Module, dict]:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ids = torch.randint(0, 64, (2, 8))
    return GPT2LMHeadModel(cfg), {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def tiny_bert() -> tuple[nn.Module, dict]:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ids = torch.randint(0, 64, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    return BertForSequenceClassification(cfg), {"input_ids": ids, "attention_mask": mask,
                                                "labels": torch.tensor([0, 2])}


def tiny_vit() -> tuple[nn.Module, dict]:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=64, num_labels=5)
    return ViTForImageClassification(cfg), {"pixel_values": torch.randn(2, 3, 16, 16),
                                            "labels": torch.tensor([1, 4])}


def tiny_resnet() -> tuple[nn.Module, dict]:
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                       layer_type="basic", num_labels=5)
    return ResNetForImageClassification(cfg), {"pixel_values": torch.randn(2, 3, 32, 32),
                                               "labels": torch.tensor([0, 3])}


def tiny_convnext() -> tuple[nn.Module, dict]:
    from transformers import ConvNextConfig, ConvNextForImageClassification

    cfg = ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5)
    return ConvNextForImageClassification(cfg), {"pixel_values": torch.randn(2, 3, 32, 32),
                                                 "labels": torch.tensor([2, 1])}


TINY_MODELS: dict[str, Callable[[], tuple[nn.Module, dict]]] = {
    "llama": tiny_llama,
    "gpt2": tiny_gpt2,
    "bert": tiny_bert,
    "vit": tiny_vit,
    "resnet": tiny_resnet,
    "convnext": tiny_convnext,
}
