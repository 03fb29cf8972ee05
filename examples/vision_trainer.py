"""Fine-tune an image classifier on real Fashion-MNIST with `transformers.Trainer` + `MECQuantCallback`.

    python examples/vision_trainer.py                                  # small ResNet from a config, FP then W2A2
    python examples/vision_trainer.py --fp-steps 20 --max-steps 20     # shortest (tests/test_examples.py)
    python examples/vision_trainer.py --model microsoft/resnet-18      # a Hub model (needs the Hub)

Measured here (2 shared CPU cores): 60-154 s with `--fp-steps 20 --max-steps 20` (CPU shared with another job).

No HF-format pretrained vision model installs offline, so by default a small ResNet (transformers
ResNetConfig) is built from its config and trained in full precision for --fp-steps first; then
quantization-aware training adds nothing but `callbacks=[MECQuantCallback(config)]`, and the model
that `trainer.save_model()` writes is the converted one (torchao int weights).
"""

from __future__ import annotations

import argparse
import time

import torch
from datasets import Dataset
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    Trainer,
    TrainingArguments,
)

import mec_quant_plugin
from mec_quant_plugin import MECQuantCallback, MECQuantConfig
from mec_quant_plugin.data.fashion_mnist import CLASSES, MEAN, STD, load_fashion_mnist


def build_model(args) -> tuple[torch.nn.Module, object]:
    labels = {"id2label": dict(enumerate(CLASSES)), "label2id": {c: i for i, c in enumerate(CLASSES)}}
    if args.model:
        model = AutoModelForImageClassification.from_pretrained(
            args.model, num_labels=10, ignore_mismatched_sizes=True, **labels)
        return model, AutoImageProcessor.from_pretrained(args.model)
    config = ResNetConfig(num_channels=1, embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1],
                          layer_type="basic", num_labels=10, downsample_in_first_stage=False, **labels)
    return ResNetForImageClassification(config), None


def make_collate(model, processor):
    def collate(rows):
        pixels = torch.stack([torch.as_tensor(r["pixel_values"]) for r in rows]).float() / 255.0  # (B, 1, 28, 28)
        if processor is None:
            pixels = (pixels - MEAN) / STD
        else:  # a Hub model: its own size, channels and normalization
            images = [(p.expand(3, -1, -1) if model.config.num_channels == 3 else p) for p in pixels]
            pixels = processor(images=images, return_tensors="pt", do_rescale=False)["pixel_values"]
        return {"pixel_values": pixels, "labels": torch.tensor([r["labels"] for r in rows])}

    return collate


def accuracy(model, dataset, collate, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(dataset), batch_size):
            batch = collate([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])
            correct += (model(pixel_values=batch["pixel_values"]).logits.argmax(-1) == batch["labels"]).sum().item()
    return correct / len(dataset)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="Hub id / folder of an image classifier (default: small ResNet)")
    p.add_argument("--weight-bits", type=int, default=2)
    p.add_argument("--act-bits", type=int, default=2)
    p.add_argument("--fp-steps", type=int, default=200, help="full-precision steps first (0 to skip)")
    p.add_argument("--max-steps", type=int, default=200, help="quantization-aware training steps")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eval-samples", type=int, default=2000)
    p.add_argument("--output-dir", default="outputs/vision-trainer")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    start = time.perf_counter()
    torch.manual_seed(args.seed)

    n_train = args.batch_size * max(args.fp_steps, args.max_steps)
    x, y = load_fashion_mnist("train", limit=n_train, normalize=False)
    xt, yt = load_fashion_mnist("test", limit=args.eval_samples, normalize=False)
    train = Dataset.from_dict({"pixel_values": x.numpy(), "labels": y.numpy()})
    test = Dataset.from_dict({"pixel_values": xt.numpy(), "labels": yt.numpy()})
    model, processor = build_model(args)
    model.accepts_loss_kwargs = False  # transformers' ResNet drops num_items_in_batch (docs/ecosystem-facts.md)
    collate = make_collate(model, processor)

    def training_args(name: str, steps: int, lr: float) -> TrainingArguments:
        return TrainingArguments(
            output_dir=f"{args.output_dir}/{name}", max_steps=steps, per_device_train_batch_size=args.batch_size,
            learning_rate=lr, lr_scheduler_type="cosine", logging_steps=25, save_strategy="no", report_to="none",
            remove_unused_columns=False, seed=args.seed, dataloader_num_workers=0,
        )

    if args.fp_steps > 0:
        Trainer(model=model, args=training_args("fp", args.fp_steps, 3e-3), train_dataset=train,
                data_collator=collate).train()
    fp_acc = accuracy(model, test, collate)
    print(f"full precision: test accuracy {fp_acc:.3f}")

    config = MECQuantConfig(weight_bits=args.weight_bits, act_bits=args.act_bits)
    trainer = Trainer(
        model=model, args=training_args("qat", args.max_steps, 1e-3), train_dataset=train, data_collator=collate,
        callbacks=[MECQuantCallback(config, run_info={"dataset": "fashion_mnist", "task": "image-classification"})],
    )
    trainer.train()  # prepared at Trainer init, converted to torchao int weights at train end
    q_acc = accuracy(trainer.model, test, collate)
    trainer.save_model(f"{args.output_dir}/final")
    reloaded = mec_quant_plugin.from_pretrained(f"{args.output_dir}/final")
    re_acc = accuracy(reloaded, test, collate)
    print(f"W{args.weight_bits}A{args.act_bits} MEC-Quant: test accuracy {q_acc:.3f} (reloaded {re_acc:.3f}), "
          f"FP {fp_acc:.3f}, on {len(test)} images; saved to {args.output_dir}/final; "
          f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
