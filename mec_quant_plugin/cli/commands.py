"""The `mec-quant` sub-commands: train (incl. the built-in default job), eval, convert."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from pathlib import Path

from ..checkpoint import TRAIN_CONFIG_FILE, CheckpointMismatchError, convert_checkpoint, is_training_checkpoint
from .arguments import (
    ConvertArguments,
    DataArguments,
    EvalArguments,
    RunArguments,
    TrainOptions,
    dataclass_from,
    extra_training_arguments,
)
from .common import DEFAULT_DEMO_DIR, TASKS, CLIError, first_line
from .data import looks_like_path
from .models import infer_task, is_hub_id, load_for_eval
from .tasks import evaluate, prepare_task

logger = logging.getLogger("mec_quant_plugin")


def _save_train_config_callback(config):
    from transformers import TrainerCallback

    class SaveMECConfig(TrainerCallback):
        """Writes the run's MECQuantConfig into every checkpoint, for `mec-quant convert`."""

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if folder.is_dir():
                    (folder / TRAIN_CONFIG_FILE).write_text(config.to_json())
            return control

    return SaveMECConfig()


def _run_builtin_default(parser, run: RunArguments, config, opts: TrainOptions, data: DataArguments) -> int:
    from ..config import MECQuantConfig

    ignored = [
        f.name for f in dataclasses.fields(MECQuantConfig)
        if f.name not in ("weight_bits", "act_bits", "step") and getattr(config, f.name) != f.default
    ]
    if data.task not in (None, "image-classification") or any(
        getattr(data, n) is not None for n in ("dataset_config", "eval_split", "max_train_samples")
    ):
        parser.error("the built-in default job takes no data options: give --model and --dataset for your own job.")
    if ignored:
        logger.warning("The built-in default job uses only --weight-bits, --act-bits, --seed, --output-dir, --quick; "
                       "ignored: %s", ", ".join(ignored))
    output_dir = run.output_dir or DEFAULT_DEMO_DIR
    _check_output_dir(parser, output_dir, None, run, None)
    _mark_output_dir(parser, output_dir, config)  # before any training: a rerun finds its own folder
    from ..data.fashion_mnist import FashionMNISTNotFound
    from ..demo import run_default

    try:
        results = run_default(output_dir=output_dir, weight_bits=config.weight_bits,
                              act_bits=config.act_bits, seed=opts.seed, quick=run.quick)
    except FashionMNISTNotFound as exc:
        print(f"mec-quant train: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a full disk or a folder turned read-only
        return _write_failed(output_dir, exc)
    if run.push_to_hub:
        logger.warning("--push-to-hub is not used by the built-in default job; push %s yourself.",
                       f"{run.output_dir or DEFAULT_DEMO_DIR}/mec-quant")
    if results is not None:
        print(json.dumps(results, indent=2, default=str))
    return 0


def _resolve_task(parser: argparse.ArgumentParser, model: str, dataset: str | None, task: str | None) -> str:
    """Check that a local model folder exists and infer the task when not given (train and eval)."""
    if not os.path.isdir(model) and (looks_like_path(model) or not is_hub_id(model)):
        parser.error(f"model folder {model!r} not found: the path does not exist (and it is not a Hub model id, "
                     "which reads 'name' or 'owner/name').")
    if task is None:
        try:
            task = infer_task(dataset, model)
        except CLIError as exc:
            parser.error(str(exc))
    if task is None:
        parser.error(f"cannot infer the task of {model!r} (its config.json names no task head transformers knows): "
                     f"pass --task (one of {', '.join(TASKS)}).")
    return task


def _is_our_run(out: Path) -> bool:
    """A folder `train` wrote (its TRAIN_CONFIG_FILE marker), or a built-in job's folder of a version
    before the marker (results.json next to the FP start in fp/)."""
    return (out / TRAIN_CONFIG_FILE).is_file() or ((out / "results.json").is_file() and (out / "fp" / "config.json").is_file())


def _check_output_dir(parser: argparse.ArgumentParser, output_dir: str, model: str | None, run: RunArguments,
                      resume: str | None) -> None:
    """Refuse to write where a user's data would be lost: into the --model folder (always), or into a
    non-empty folder that is not a mec-quant run unless --overwrite-output-dir. A run is recognised by
    the TRAIN_CONFIG_FILE that `train` writes into its output folder first."""
    out = Path(output_dir).resolve()
    if model is not None and os.path.isdir(model):
        base = Path(model).resolve()
        if out == base or base in out.parents:
            parser.error(f"--output-dir {output_dir!r} is (inside) the --model folder {model!r}: the base model would "
                         "be overwritten; choose another --output-dir.")
    if not out.is_dir() or not any(out.iterdir()) or _is_our_run(out) or run.overwrite_output_dir:
        return
    if resume and out in Path(resume).resolve().parents:
        return  # resuming a run whose checkpoints live in this folder
    parser.error(f"--output-dir {output_dir!r} is not empty and is not a mec-quant run (no {TRAIN_CONFIG_FILE}): "
                 "its files would be replaced; choose another folder or pass --overwrite-output-dir.")


def _mark_output_dir(parser: argparse.ArgumentParser, output_dir: str, config) -> None:
    """Create the output folder and write the run's config into it (the marker `_check_output_dir`
    recognises); a folder that cannot be written is one usage line."""
    try:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / TRAIN_CONFIG_FILE).write_text(config.to_json())
    except OSError as exc:
        parser.error(f"cannot write to --output-dir {output_dir!r}: {first_line(exc)}")


def _write_failed(output_dir: str, exc: OSError) -> int:
    """One line for a disk that fills up (or a folder that turns read-only) during training or the
    final save; says which checkpoint to resume from when there is one. Returns the exit status."""
    checkpoints = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: p.stat().st_mtime) \
        if Path(output_dir).is_dir() else []
    hint = f"; resume with --resume-from-checkpoint {checkpoints[-1]}" if checkpoints else ""
    print(f"mec-quant train: error: training into {output_dir} stopped: {first_line(exc)}{hint}", file=sys.stderr)
    return 1


def is_full_precision(config) -> bool:
    """`--weight-bits none --act-bits none` (and no explicit `--edge-layers 8bit`): the config quantizes
    nothing, so `train` is plain full-precision fine-tuning (no quantizer, no MEC term, a normal
    transformers model saved), e.g. the FP start of a later low-bit run."""
    return config.weight_bits is None and config.act_bits is None and config.edge_layers != "8bit"


def _warn_ignored_in_fp_mode(config) -> None:
    from ..config import MECQuantConfig

    ignored = [f.name for f in dataclasses.fields(MECQuantConfig)
               if f.name not in ("weight_bits", "act_bits", "edge_layers", "step") and getattr(config, f.name) != f.default]
    logger.info("--weight-bits none --act-bits none: full-precision fine-tuning (no quantizer, no MEC term); the "
                "output is a plain transformers model")
    if ignored:
        logger.warning("full-precision fine-tuning ignores the quantization and MEC options: %s", ", ".join(ignored))


def _check_training_options(parser: argparse.ArgumentParser, opts: TrainOptions) -> None:
    """Ordinary mistakes in the training options as one usage line, before anything is loaded."""
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(opts, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(opts, name)}.")
    if not math.isfinite(opts.learning_rate) or opts.learning_rate <= 0:
        parser.error(f"--learning-rate must be a positive number, got {opts.learning_rate}.")
    resume = opts.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() not in ("true", "false") and not Path(resume).is_dir():
        parser.error(f"--resume-from-checkpoint {resume!r}: no such folder (give a checkpoint-N folder of an earlier run).")


def cmd_train(parser: argparse.ArgumentParser, ns: argparse.Namespace, rest: list[str]) -> int:
    from ..config import MECQuantConfig

    data = dataclass_from(ns, DataArguments)
    run = dataclass_from(ns, RunArguments)
    opts = dataclass_from(ns, TrainOptions)
    try:
        config = MECQuantConfig.from_dict(
            {f.name: getattr(ns, f.name) for f in dataclasses.fields(MECQuantConfig) if hasattr(ns, f.name)}
        )
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    extra = extra_training_arguments(parser, rest)
    if data.model is None and data.dataset is None:
        if extra:
            parser.error("the built-in default job takes no TrainingArguments: give --model and --dataset for your own job.")
        return _run_builtin_default(parser, run, config, opts, data)
    if data.model is None or data.dataset is None:
        parser.error("give both --model and --dataset (or neither, for the built-in default job).")
    for name in ("block_size", "max_length"):
        if getattr(data, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(data, name)}.")
    for name in ("max_train_samples", "max_eval_samples"):
        if getattr(data, name) is not None and getattr(data, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(data, name)}.")

    _check_training_options(parser, opts)
    task = _resolve_task(parser, data.model, data.dataset, data.task)
    output_dir = run.output_dir or f"outputs/mec-quant-{Path(data.model.rstrip('/')).name}"
    _check_output_dir(parser, output_dir, data.model, run, opts.resume_from_checkpoint)
    try:
        prepared = prepare_task(task, data.model, data, seed=opts.seed, train_split=data.train_split,
                                eval_split=data.eval_split)
    except CLIError as exc:
        parser.error(str(exc))
    except FileNotFoundError as exc:  # the built-in data sets say how to get them
        parser.error(first_line(exc))

    from transformers import Trainer, TrainingArguments

    from ..integrations.trainer import MECQuantCallback

    targs = {f.name: getattr(opts, f.name) for f in dataclasses.fields(TrainOptions) if f.name != "resume_from_checkpoint"}
    targs.update(output_dir=output_dir, remove_unused_columns=task != "image-classification")
    targs.update(extra)
    try:
        args = TrainingArguments(**targs)
    except (TypeError, ValueError) as exc:
        parser.error(f"invalid training arguments: {first_line(exc)}")
    run_info = {"base_model": data.model, "dataset": data.dataset, "task": task}
    if run.push_to_hub:
        run_info["repo_id"] = run.push_to_hub
    callbacks = [MECQuantCallback(config, run_info=run_info), _save_train_config_callback(config)]
    if is_full_precision(config):
        _warn_ignored_in_fp_mode(config)
        callbacks = []  # plain fine-tuning: the Trainer saves a normal transformers model
    _mark_output_dir(parser, output_dir, config)
    try:  # the callback prepares the model here: e.g. a --group-size that does not divide a layer
        trainer = Trainer(
            model=prepared.model, args=args, train_dataset=prepared.train, data_collator=prepared.collator,
            processing_class=prepared.processing_class, callbacks=callbacks,
        )
    except (TypeError, ValueError) as exc:
        parser.error(f"cannot prepare {data.model!r} with these settings: {first_line(exc)}")
    try:  # a full disk or a folder turned read-only: one line, exit 1 (the saves themselves are atomic)
        trainer.train(resume_from_checkpoint=opts.resume_from_checkpoint)
        model = trainer.model  # converted to torchao int weights by the callback at the end of training
        metrics = evaluate(model, prepared.eval, prepared.collator, task, args.per_device_eval_batch_size)
        info = model.__dict__.get("_mec_quant_run_info")
        if isinstance(info, dict):
            info.setdefault("metrics", {}).update(metrics)
        if trainer.is_world_process_zero():
            trainer.save_model(output_dir)
            (Path(output_dir) / "eval_results.json").write_text(json.dumps(metrics, indent=2))
    except OSError as exc:
        return _write_failed(output_dir, exc)
    except CheckpointMismatchError as exc:  # --resume-from-checkpoint of another run or other settings
        parser.error(f"--resume-from-checkpoint: {first_line(exc)}")
    except CLIError as exc:  # found while reading the data (e.g. an image with pixels out of range)
        print(f"mec-quant train: error: {exc}", file=sys.stderr)
        return 1
    if trainer.is_world_process_zero():
        print(json.dumps({"output_dir": output_dir, "evaluated_on": prepared.eval_description, **metrics}, indent=2))
        if run.push_to_hub:
            try:
                model.push_to_hub(run.push_to_hub)
                if prepared.processing_class is not None:
                    prepared.processing_class.push_to_hub(run.push_to_hub)
            except Exception as exc:
                print(f"mec-quant train: error: the model is saved in {output_dir}, but pushing to "
                      f"{run.push_to_hub!r} failed: {first_line(exc)}", file=sys.stderr)
                return 1
            print(f"pushed to https://huggingface.co/{run.push_to_hub}")
    return 0


def _quantized_model_of_checkpoint(parser: argparse.ArgumentParser, checkpoint: str):
    """The quantized model of a training checkpoint (float master weights plus step sizes): prepared with
    the run's config, loaded, converted to torchao int weights in memory, i.e. what `convert` would save.
    Without the run's config it is a usage error: its float weights are not the model's accuracy."""
    from ..api import convert_model
    from ..checkpoint import load_training_checkpoint

    try:
        model, config = load_training_checkpoint(checkpoint)
    except FileNotFoundError:
        parser.error(f"{checkpoint!r} is a MEC-Quant training checkpoint (float master weights and step sizes) without "
                     f"the run's {TRAIN_CONFIG_FILE}, so its quantized model cannot be rebuilt (scoring the float weights "
                     "would not be the model's accuracy): convert it first with `mec-quant convert --model "
                     f"{checkpoint} --output-dir OUT --config RUN_CONFIG.json` and evaluate OUT.")
    except ValueError as exc:
        parser.error(f"cannot evaluate the training checkpoint {checkpoint!r}: {exc}")
    logger.info("%s is a training checkpoint: evaluating its quantized model (W%sA%s, converted in memory as "
                "`mec-quant convert` would save it), not its float master weights", checkpoint, config.weight_bits,
                config.act_bits)
    return convert_model(model)


def cmd_eval(parser: argparse.ArgumentParser, ns: argparse.Namespace, rest: list[str]) -> int:
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args = dataclass_from(ns, EvalArguments)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}.")
    task = _resolve_task(parser, args.model, args.dataset, args.task)
    try:
        if Path(args.model).is_dir() and is_training_checkpoint(args.model):
            model = _quantized_model_of_checkpoint(parser, args.model)
        else:
            model = load_for_eval(args.model, task)
        prepared = prepare_task(task, args.model, args, seed=args.seed, model=model, eval_split=args.split,
                                for_training=False)
    except CLIError as exc:
        parser.error(str(exc))
    except FileNotFoundError as exc:
        parser.error(first_line(exc))
    metrics = evaluate(prepared.model, prepared.eval, prepared.collator, task, args.batch_size)
    print(json.dumps({"model": args.model, "dataset": args.dataset, "task": task, "evaluated_on": prepared.eval_description, **metrics}, indent=2))
    return 0


def cmd_convert(parser: argparse.ArgumentParser, ns: argparse.Namespace, rest: list[str]) -> int:
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from ..integrations.hub import MEC_CONFIG_FILE
    from .exports import check_supported, export_to, push_folder

    args = dataclass_from(ns, ConvertArguments)
    model = Path(args.model)
    if not model.is_dir():
        parser.error(f"checkpoint folder {args.model!r} not found.")
    converted = (model / MEC_CONFIG_FILE).is_file()
    if converted and args.format == "torchao":
        parser.error(f"{args.model!r} is already converted (it has {MEC_CONFIG_FILE}): give --format gguf or "
                     "--format onnx to export it, or load it with mec_quant_plugin.from_pretrained.")
    if not converted and args.output_dir is None:
        parser.error("--output-dir is required to convert a training checkpoint (where the converted model goes).")
    folder = model if converted else Path(args.output_dir)
    out_dir = Path(args.output_dir) if args.output_dir is not None else folder
    if args.push_to_hub and out_dir.resolve() != folder.resolve():
        parser.error(f"--push-to-hub uploads the exported file beside the model {str(folder)!r}: omit --output-dir "
                     "(the file then goes into the model folder).")
    try:
        if args.format != "torchao":
            check_supported(model, args.format, out_dir)  # before a (slow) conversion whose export would be refused
        if not converted:
            convert_checkpoint(args.model, folder, args.config)
            print(f"converted {args.model} -> {folder}")
        if args.format != "torchao":
            exported, summary = export_to(folder, args.format, out_dir)
            print(f"exported {folder} -> {exported}\n{summary}")
    except (FileNotFoundError, ValueError, CLIError) as exc:
        parser.error(first_line(exc) if isinstance(exc, CLIError) else str(exc))
    if args.push_to_hub:
        try:
            pushed = push_folder(folder, args.push_to_hub)
        except Exception as exc:  # network, auth, permissions: the local files stay as written
            print(f"mec-quant convert: error: the model is saved in {folder}, but pushing it to "
                  f"{args.push_to_hub!r} failed: {first_line(exc)}", file=sys.stderr)
            return 1
        print(f"pushed {', '.join(pushed)} to https://huggingface.co/{args.push_to_hub}")
    return 0
