"""Per-task preprocessing (`prepare_task` -> `Prepared`) and a Trainer-free `evaluate`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .arguments import DataArguments, EvalArguments
from .common import CLIError
from .data import is_line_text, label_encoding, load_raw_dataset, pick_column, take_first, train_eval_splits
from .models import load_image_processor, load_model, load_tokenizer

if TYPE_CHECKING:
    import numpy as np


def unit_range_pixels(img) -> np.ndarray:
    """One image (PIL, array or nested list; HxW, HxWxC or CxHxW) as float32 values in [0, 1]:
    integer pixels (uint8, or the int64 that `np.asarray` makes of the lists `datasets` hands over for
    Array2D/Array3D uint8) are divided by 255; float pixels must already be in [0, 1].

    Raises:
        CLIError: integers outside 0..255 or floats outside 0..1 (the model would see inputs out of the
            range its preprocessing expects).
    """
    import numpy as np

    arr = np.asarray(img)
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.integer):
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise CLIError(f"image pixels must be integers in 0..255 or floats in 0..1, got integers in "
                           f"[{arr.min()}, {arr.max()}]; rescale the image column first.")
        return arr.astype(np.float32) / 255.0
    arr = arr.astype(np.float32)
    if arr.size and not (np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0):
        raise CLIError(f"image pixels must be integers in 0..255 or floats in 0..1, got floats in "
                       f"[{arr.min()}, {arr.max()}]; store uint8 pixels or scale the floats to 0..1 first.")
    return arr


def _hwc(arr):
    """HxW or HxWxC (a CxHxW array with C in 1, 3, 4 is transposed)."""
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)
    return arr


def _image_transform(model_config, processor, image_column: str, label_column: str, label_map, fashion: bool):
    """A `with_transform` function: images -> `pixel_values` (model's channels and size) + `labels`.
    Every storage (PIL, uint8 / int arrays and lists, float 0..1 arrays and lists) reaches the model
    as pixels / 255, then resized and standardized (or through the model's image processor)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    channels = getattr(model_config, "num_channels", 3)
    size = getattr(model_config, "image_size", None)
    if isinstance(size, (list, tuple)):
        size = tuple(size[-2:])
    elif isinstance(size, int):
        size = (size, size)
    if fashion:
        from ..data.fashion_mnist import MEAN, STD

        mean, std = MEAN, STD
    else:
        mean, std = 0.5, 0.5

    def to_chw(img) -> torch.Tensor:
        if hasattr(img, "convert"):
            img = img.convert("RGB" if channels == 3 else "L")
        t = torch.from_numpy(np.ascontiguousarray(_hwc(unit_range_pixels(img))))
        t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
        if t.shape[0] == 4:
            t = t[:3]
        if t.shape[0] == 1 and channels == 3:
            t = t.expand(3, -1, -1)
        elif t.shape[0] == 3 and channels == 1:
            t = t.mean(0, keepdim=True)
        return t

    def to_pil(img):
        from PIL import Image

        if not hasattr(img, "convert"):
            arr = np.round(_hwc(unit_range_pixels(img)) * 255.0).astype(np.uint8)
            img = Image.fromarray(arr[:, :, 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
        return img.convert("RGB" if channels == 3 else "L")

    def transform(batch: dict[str, list]) -> dict[str, Any]:
        images = batch[image_column]
        if processor is not None:
            pixels = list(processor(images=[to_pil(im) for im in images], return_tensors="pt")["pixel_values"])
        else:
            tensors = [to_chw(im) for im in images]
            target = size or tuple(tensors[0].shape[-2:])
            pixels = [
                ((F.interpolate(t[None], size=target, mode="bilinear", align_corners=False)[0]
                  if tuple(t.shape[-2:]) != target else t) - mean) / std
                for t in tensors
            ]
        labels = batch[label_column]
        if label_map is not None:
            labels = [label_map[v] for v in labels]
        return {"pixel_values": pixels, "labels": [int(v) for v in labels]}

    return transform


# Decode a whole image column into memory only up to this many bytes of uint8 pixels (CIFAR-10
# is 184 MB); larger sets keep the per-image path.
DECODE_ONCE_MAX_BYTES = 2 * 1024**3


def _decoded_image_sets(train, evals, image_col: str, label_col: str, label_map, *, augment: bool):
    """Train/eval as `DecodedImageDataset`s of images decoded ONCE (cached; see data/images.py),
    the training set randomly cropped and flipped per item when `augment`; None when the images
    differ in size or would not fit the decode-once budget (the per-image path is used then)."""
    import logging

    from ..data.images import DecodedImageDataset, decode_images

    logger = logging.getLogger("mec_quant_plugin")
    sets = []
    for ds, aug in ((train, augment), (evals, False)):
        if ds is None:
            sets.append(None)
            continue
        first = ds[0][image_col]
        size = getattr(first, "size", None)
        pixels = (size[0] * size[1] * 3) if size is not None else None
        if pixels is not None and pixels * len(ds) > DECODE_ONCE_MAX_BYTES:
            logger.info("images: %d x %s too large to decode once; decoding per batch", len(ds), size)
            return None
        try:
            images = decode_images(ds, image_col)
        except ValueError as exc:  # several sizes, or float pixels: the per-image path handles both
            logger.info("images not decoded once (%s); decoding per batch without augmentation", exc)
            return None
        labels = [label_map[v] for v in ds[label_col]] if label_map is not None else [int(v) for v in ds[label_col]]
        sets.append(DecodedImageDataset(images, labels, augment=aug))
    return sets[0], sets[1]


class ImageBatchCollator:
    """uint8 images -> the model's `pixel_values`: through the model's image processor when it has
    one, else scaled to [0, 1], resized to the model's `image_size`, standardized (Fashion-MNIST's
    statistics for that data set, else mean 0.5 / std 0.5) and converted to the model's channels."""

    def __init__(self, model_config, processor, *, fashion: bool) -> None:
        self.processor = processor
        self.channels = getattr(model_config, "num_channels", 3)
        size = getattr(model_config, "image_size", None)
        self.size = tuple(size[-2:]) if isinstance(size, (list, tuple)) else (size, size) if isinstance(size, int) else None
        if fashion:
            from ..data.fashion_mnist import MEAN, STD

            self.mean, self.std = MEAN, STD
        else:
            self.mean, self.std = 0.5, 0.5

    def __call__(self, features: list[dict]) -> dict:
        import torch
        import torch.nn.functional as F

        images = torch.stack([f["image"] for f in features])
        labels = torch.stack([torch.as_tensor(f["labels"]) for f in features]).long()
        if self.processor is not None:
            if images.shape[1] == 1 and self.channels == 3:
                images = images.expand(-1, 3, -1, -1)
            arrays = [im.permute(1, 2, 0).numpy() for im in images]
            return {"pixel_values": self.processor(images=arrays, return_tensors="pt")["pixel_values"], "labels": labels}
        x = images.float() / 255.0
        if x.shape[1] == 4:
            x = x[:, :3]
        if x.shape[1] == 1 and self.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] == 3 and self.channels == 1:
            x = x.mean(1, keepdim=True)
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return {"pixel_values": (x - self.mean) / self.std, "labels": labels}


def image_datasets(model_config, processor, train, evals, image_col: str, label_col: str, label_map, *,
                   fashion: bool, augment: bool):
    """(train, eval, collator) turning an image column into the model's `pixel_values` (and `labels`):
    decoded once when the images allow it (`_decoded_image_sets` + `ImageBatchCollator`), else per
    image (`_image_transform`, the datasets' `with_transform`). `train` may be None (evaluation only)."""
    from transformers import default_data_collator

    tensors = _decoded_image_sets(train, evals, image_col, label_col, label_map, augment=augment)
    if tensors is not None:
        return tensors[0], tensors[1], ImageBatchCollator(model_config, processor, fashion=fashion)
    fn = _image_transform(model_config, processor, image_col, label_col, label_map, fashion=fashion)
    for ds in (train, evals):  # pixels out of range: a usage error now, not a traceback once training runs
        if ds is not None and len(ds):
            fn(ds[:1])
    return (train.with_transform(fn) if train is not None else None), evals.with_transform(fn), default_data_collator


@dataclass
class Prepared:
    """Everything a task needs: model, processing class, datasets ready for the model, collator."""

    model: Any
    processing_class: Any
    train: Any
    eval: Any
    collator: Any
    task: str
    eval_description: str = ""  # what `eval` is: e.g. "split 'validation'", "the first 4 of 40 lines of ..."


def prepare_task(
    task: str, model_name: str, data: DataArguments | EvalArguments, *, seed: int, model=None,
    train_split: str = "train", eval_split: str | None = None, for_training: bool = True,
) -> Prepared:
    """Load the model (unless given) and turn the dataset into model inputs for `task`."""
    from transformers import DataCollatorWithPadding, default_data_collator

    max_train = getattr(data, "max_train_samples", None) if for_training else 0
    fashion = data.dataset.lower().startswith("fashion")
    raw = load_raw_dataset(data.dataset, task, config=data.dataset_config,
                           max_train_samples=max_train if fashion else None,
                           max_eval_samples=data.max_eval_samples if fashion else None)
    train, evals, eval_description = train_eval_splits(
        raw, train_split, eval_split, seed, eval_option="--eval-split" if for_training else "--split")
    line_text = is_line_text(evals)
    if not for_training:
        train = None
    elif data.max_train_samples is not None and task != "causal-lm":
        train = take_first(train.shuffle(seed=seed), data.max_train_samples)
    if data.max_eval_samples is not None and task != "causal-lm":
        evals = take_first(evals.shuffle(seed=seed), data.max_eval_samples)  # as the transformers examples: not the first rows of a class-sorted split
    ref = train if train is not None else evals

    if task in ("image-classification", "text-classification"):
        label_col = pick_column(ref, data.label_column, ("label", "labels"), "label", "--label-column")
        names, label_map = label_encoding(ref, evals, label_col)
        if model is None:
            kwargs = {}
            if for_training:
                kwargs = dict(num_labels=len(names), id2label=dict(enumerate(names)),
                              label2id={n: i for i, n in enumerate(names)}, ignore_mismatched_sizes=True)
            model = load_model(task, model_name, **kwargs)

    if task == "image-classification":
        image_col = pick_column(ref, data.image_column, ("image", "img", "pixel_values"), "image", "--image-column")
        processor = load_image_processor(model_name)
        train, evals, collator = image_datasets(model.config, processor, train, evals, image_col, label_col, label_map,
                                                fashion=fashion, augment=for_training and getattr(data, "augment", False))
        return _described(Prepared(model, processor, train, evals, collator, task, eval_description), for_training)

    tokenizer = load_tokenizer(model_name)
    text_col = pick_column(ref, data.text_column, ("text", "sentence", "content"), "text", "--text-column", kind="string")
    if task == "text-classification":
        if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
            model.config.pad_token_id = tokenizer.pad_token_id

        def tokenize(batch):
            out = tokenizer(batch[text_col], truncation=True, max_length=data.max_length)
            labels = batch[label_col]
            out["labels"] = [label_map[v] for v in labels] if label_map is not None else [int(v) for v in labels]
            return out

        def encode(ds):
            return ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc="tokenizing")

        return _described(Prepared(model, tokenizer, encode(train) if train is not None else None, encode(evals),
                                   DataCollatorWithPadding(tokenizer), task, eval_description), for_training)

    # causal-lm: concatenate the texts and cut blocks of block_size tokens, as transformers' run_clm;
    # an EOS between documents (rows of json/csv/parquet/Hub data), none between the lines of text files
    if model is None:
        model = load_model(task, model_name)
    limit = min(data.block_size, getattr(model.config, "max_position_embeddings", None) or data.block_size)
    if tokenizer.model_max_length and tokenizer.model_max_length < 1e9:
        limit = min(limit, tokenizer.model_max_length)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None and not line_text else []

    def tokenize_lm(batch):
        ids = tokenizer(batch[text_col], add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": [x + eos for x in ids]}

    def group(batch):
        flat = [t for seq in batch["input_ids"] for t in seq]
        n = len(flat) // limit * limit
        blocks = [flat[i : i + limit] for i in range(0, n, limit)]
        return {"input_ids": blocks, "attention_mask": [[1] * limit for _ in blocks], "labels": [list(b) for b in blocks]}

    def blocks(ds, n):
        ds = ds.map(tokenize_lm, batched=True, remove_columns=ds.column_names, desc="tokenizing")
        ds = ds.map(group, batched=True, batch_size=1000, desc=f"grouping into blocks of {limit}")
        return take_first(ds, n)

    train = blocks(train, data.max_train_samples) if train is not None else None
    evals = blocks(evals, data.max_eval_samples)
    if (train is not None and len(train) == 0) or len(evals) == 0:
        raise CLIError(f"the texts are shorter than one block of {limit} tokens: lower --block-size.")
    return _described(Prepared(model, tokenizer, train, evals, default_data_collator, task, eval_description),
                      for_training, block=limit)


def _described(prepared: Prepared, for_training: bool, block: int | None = None) -> Prepared:
    """Log what the evaluation scores (which split, how many examples or tokens); returns `prepared`."""
    import logging

    n = len(prepared.eval)
    size = f"{n} blocks of {block} tokens ({n * block} tokens)" if block else f"{n} examples"
    hint = "" if for_training or prepared.eval_description.startswith("split ") else "; --split names another split"
    logging.getLogger("mec_quant_plugin").info("evaluation scores %s: %s%s", prepared.eval_description, size, hint)
    return prepared


def evaluate(model, dataset, collator, task: str, batch_size: int = 8) -> dict[str, float]:
    """Accuracy (+ loss) for classification, perplexity (+ loss) for causal-lm; no Trainer needed."""
    import torch
    from torch.utils.data import DataLoader

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, correct, count, tokens = 0.0, 0, 0, 0
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collator):
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(**batch)
            n = batch["labels"].shape[0]
            loss_sum += float(out.loss) * n
            count += n
            if task == "causal-lm":  # the tokens predicted (each block's first token is not)
                tokens += int((batch["labels"][:, 1:] != -100).sum())
            if task != "causal-lm":
                correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
    model.train(was_training)
    loss = loss_sum / max(count, 1)
    metrics = {"eval_loss": round(loss, 6), "eval_samples": count}
    if task == "causal-lm":
        metrics["eval_perplexity"] = round(math.exp(min(loss, 50.0)), 4)
        metrics["eval_tokens"] = tokens
    else:
        metrics["eval_accuracy"] = round(correct / max(count, 1), 6)
    return metrics
