"""FSDP2 (`torch.distributed.fsdp.fully_shard`): two gloo processes on CPU train exactly like one
process on the concatenated batch, as tests/integrations/test_ddp.py checks for DDP.

accelerate 1.15 turns FSDP on only for accelerator devices (`AcceleratorState` sets
`DistributedType.FSDP` in its multi-GPU/XPU/NPU/... branch): on CPU it silently drops the Trainer's
FSDP plugin and wraps the model in DDP. Two tests therefore:
- a plain loop doing what accelerate's `fsdp2_prepare_model` does (one `fully_shard` unit per decoder
  layer, then the root) with the plugin's `MECRegularizer`: the term codes the global batch, every
  weight and step size (sharded DTensors) ends equal to one process's, a torch.distributed.checkpoint
  saved after step 1 resumes to the same end, the gathered full state dict converts to the same model;
- the Trainer + MECQuantCallback with accelerate's own FSDP2 code, the CPU refusal lifted in the test
  (`_force_fsdp_on_cpu`): same terms and weights, resume_from_checkpoint, and a checkpoint that
  converts to one process's int model.
Activation quantization does not shard yet (strict xfail below).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parents[1]
STEPS = 3
LR = 1e-2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch() -> dict[str, torch.Tensor]:
    """Four rows of 8 token ids; each of the two ranks trains on two of them."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (4, 8), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _build(world: int):
    """A prepared tiny Llama (W2 weights, float activations), its regularizer and optimizer;
    sharded with one FSDP2 unit per decoder layer plus the root when world > 1."""
    from testing_utils import tiny_llama
    from torch.distributed.fsdp import fully_shard

    from mec_quant_plugin import MECQuantConfig, prepare_model
    from mec_quant_plugin.objective import MECRegularizer

    torch.manual_seed(0)
    model, _ = tiny_llama()
    config = MECQuantConfig(weight_bits=2, act_bits=None, mec_gather=True, mec_weight=1.0)
    prepare_model(model, config, progress=False)
    regularizer = MECRegularizer(model, config)
    if world > 1:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    return model, regularizer, optimizer, config


def _step(model, regularizer, optimizer, batch: dict[str, torch.Tensor], step: int) -> tuple[float, float]:
    regularizer.set_progress(step, STEPS)
    loss = model(**batch).loss
    term = regularizer()
    (loss + term).backward()
    optimizer.step()
    optimizer.zero_grad()
    return term.item(), regularizer.last_stats.get("rows", 0.0)


def _full_state(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as a full (unsharded) tensor, on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not any(hasattr(p, "full_tensor") for p in model.parameters()):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def _train(rank: int, world: int, port: int, out_dir: str) -> None:
    sys.path.insert(0, str(HERE))
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from mec_quant_plugin import convert_model

    dist.init_process_group("gloo", rank=rank, world_size=world)
    batch = {k: v.chunk(world)[rank] for k, v in _global_batch().items()}
    model, regularizer, optimizer, _ = _build(world)
    sharded = [n for n, p in model.named_parameters() if type(p).__name__ == "DTensor"]
    terms = [_step(model, regularizer, optimizer, batch, 0)]
    if world > 1:
        # A sharded checkpoint after step 1, loaded into a freshly built (re-initialized) model.
        ckpt = os.path.join(out_dir, "checkpoint-1")
        weights, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": weights, "optim": optim_state}, checkpoint_id=ckpt)
        regularizer.remove()
        model, regularizer, optimizer, _ = _build(world)
        weights, optim_state = get_state_dict(model, optimizer)
        state = {"model": weights, "optim": optim_state}
        dcp.load(state, checkpoint_id=ckpt)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    terms += [_step(model, regularizer, optimizer, batch, step) for step in range(1, STEPS)]
    full = _full_state(model)
    if rank == 0:
        # The final save: the gathered weights and step sizes converted in one unsharded model.
        regularizer.remove()
        plain, reg, _, _ = _build(1)
        reg.remove()
        plain.load_state_dict(full)
        convert_model(plain.eval())
        with torch.no_grad():
            logits = plain(input_ids=_global_batch()["input_ids"]).logits
        codes = {n: m.weight.qdata.clone() for n, m in plain.named_modules() if hasattr(getattr(m, "weight", None), "qdata")}
        torch.save({"state": full, "terms": terms, "sharded": sharded, "logits": logits, "codes": codes},
                   os.path.join(out_dir, "result.pt"))
    dist.destroy_process_group()


@pytest.mark.distributed
def test_fsdp2_two_processes_equal_one_process_on_the_concatenated_batch(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    mp.spawn(_train, args=(1, _free_port(), str(one)), nprocs=1, join=True)
    mp.spawn(_train, args=(2, _free_port(), str(two)), nprocs=2, join=True)
    a = torch.load(one / "result.pt", weights_only=True)
    b = torch.load(two / "result.pt", weights_only=True)
    # FSDP2 sharded the weights AND their step sizes (one DTensor each); one process shards nothing
    assert not a["sharded"] and any(n.endswith("weight_fake_quantizer.scale") for n in b["sharded"])
    assert any(n.endswith("q_proj.weight") for n in b["sharded"])
    # every step had a real term; each process captured half the rows and coded the global batch
    (a_terms, a_rows), (b_terms, b_rows) = zip(*a["terms"]), zip(*b["terms"])
    assert len(a_terms) == len(b_terms) == STEPS and all(v != 0 and v == v for v in a_terms + b_terms)
    assert all(r > 0 for r in b_rows) and list(a_rows) == [2 * r for r in b_rows]
    assert list(a_terms) == pytest.approx(list(b_terms), rel=1e-5)
    # resumed from the sharded checkpoint after step 1, the end equals one uninterrupted process
    assert a["state"].keys() == b["state"].keys()
    diffs = {k: (v.float() - b["state"][k].float()).abs().max().item() for k, v in a["state"].items()}
    assert max(diffs.values()) < 1e-5, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
    # the converted model: the same int codes and outputs as one process's
    assert a["codes"] and a["codes"].keys() == b["codes"].keys()
    for name, codes in a["codes"].items():
        assert torch.equal(codes, b["codes"][name]), name
    torch.testing.assert_close(b["logits"], a["logits"], atol=1e-5, rtol=1e-5)


@pytest.fixture
def one_rank_group():
    """A one-process gloo group, so `fully_shard` turns parameters into DTensors in this process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _sharded_tiny_llama():
    from testing_utils import tiny_llama
    from torch.distributed.fsdp import fully_shard

    from mec_quant_plugin import MECQuantConfig, prepare_model

    model, batch = tiny_llama()
    prepare_model(model, MECQuantConfig(weight_bits=2, act_bits=None), progress=False)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model, batch


@pytest.mark.distributed
def test_convert_model_refuses_a_sharded_model_naming_the_way_out(one_rank_group):
    """convert_model on FSDP2's DTensor shards used to build torchao tensors around the shards: the
    'converted' model failed in its first forward (aten.index got mixed Tensor and DTensor)."""
    from mec_quant_plugin import convert_model

    model, _ = _sharded_tiny_llama()
    with pytest.raises(ValueError, match=r"sharded.*full_state_dict"):
        convert_model(model)
    assert type(model.model.layers[0].self_attn.q_proj.weight).__name__ == "DTensor"  # left as it was


@pytest.mark.distributed
def test_callback_leaves_a_sharded_model_unconverted_at_train_end(one_rank_group):
    """Under FSDP2 the callback's end-of-training conversion cannot convert shards in place: it warns
    and leaves the float weights and step sizes for the Trainer's (gathering) save."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from mec_quant_plugin import MECQuantCallback, MECQuantConfig

    model, batch = _sharded_tiny_llama()
    cb = MECQuantCallback(MECQuantConfig(weight_bits=2, act_bits=None))
    cb.attach(model)
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to=[])
    with pytest.warns(UserWarning, match="sharded"):
        cb.on_train_end(args, TrainerState(), TrainerControl(), model=model)
    assert model.model.layers[0].self_attn.q_proj.weight_fake_quantizer is not None
    assert not cb.term.converted


def test_example_accelerate_config_is_fsdp2():
    """examples/accelerate_fsdp2.yaml loads as accelerate's own config: FSDP, version 2, per-block units."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    config = ClusterConfig.from_yaml_file(str(HERE.parent / "examples" / "accelerate_fsdp2.yaml"))
    assert config.distributed_type == DistributedType.FSDP and not config.use_cpu
    assert config.fsdp_config["fsdp_version"] == 2
    assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"


@pytest.mark.distributed
@pytest.mark.xfail(strict=True, raises=ValueError, reason="open (issue 13 §2): activation step size and offset are "
                   "0-dim Parameters and fully_shard refuses scalars; making them 1-element also needs calibration "
                   "to write into the shards (FSDP2 drops in-place writes to the unsharded parameters)")
def test_fully_shard_accepts_activation_quantizers(one_rank_group):
    from testing_utils import tiny_llama
    from torch.distributed.fsdp import fully_shard

    from mec_quant_plugin import MECQuantConfig, prepare_model

    model, batch = tiny_llama()
    prepare_model(model, MECQuantConfig(weight_bits=2, act_bits=4), progress=False)
    fully_shard(model)
    model(**batch).loss.backward()


# --- the Trainer path: accelerate's own fsdp2_prepare_model, with its CPU refusal lifted ----------


def _force_fsdp_on_cpu() -> None:
    """Keep the FSDP plugin the Trainer passes to accelerate on CPU: accelerate 1.15's AcceleratorState
    drops it outside its accelerator branch (and resets the type when re-initialized), so re-apply it
    after every AcceleratorState init. Everything else (fully_shard per decoder layer and the root,
    the gathered FULL_STATE_DICT saves, resume) is accelerate's and the Trainer's own code."""
    import accelerate
    import accelerate.state as state_module
    from accelerate.utils import DistributedType

    kept: dict[str, object] = {}
    accelerator_init, state_init = accelerate.Accelerator.__init__, state_module.AcceleratorState.__init__

    def apply(state) -> None:
        if "plugin" in kept and state.distributed_type == DistributedType.MULTI_CPU:
            state.distributed_type = DistributedType.FSDP
            state.fsdp_plugin = kept["plugin"]

    def new_accelerator_init(self, *args, fsdp_plugin=None, **kwargs):
        if fsdp_plugin is not None:
            kept["plugin"] = fsdp_plugin
        accelerator_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        apply(self.state)

    def new_state_init(self, *args, **kwargs):
        state_init(self, *args, **kwargs)
        apply(self)

    accelerate.Accelerator.__init__ = new_accelerator_init
    state_module.AcceleratorState.__init__ = new_state_init


def _trainer_run(rank: int, world: int, port: int, out_dir: str) -> None:
    sys.path.insert(0, str(HERE))
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    _force_fsdp_on_cpu()
    from testing_utils import make_trainer

    from mec_quant_plugin import MECQuantConfig

    config = MECQuantConfig(weight_bits=2, act_bits=None, mec_gather=True, mec_weight=1.0)
    fsdp = dict(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    common = dict(rows=8, per_device_train_batch_size=4 // world, max_steps=2, learning_rate=1e-3,
                  optim="adamw_torch",  # stateless SGD: torch's FSDP2 optimizer load on resume finds no device
                  ddp_backend="gloo" if world > 1 else None, **(fsdp if world > 1 else {}))
    results = {}
    for run, extra in (("straight", dict(save_strategy="steps", save_steps=1)), ("resumed", {})):
        torch.manual_seed(0)
        trainer, cb, _ = make_trainer("llama", os.path.join(out_dir, run), config, **common, **extra)
        cb.convert_on_train_end = world > 1  # one process would convert; sharded, it warns and does not
        resume = os.path.join(out_dir, "straight", "checkpoint-1") if run == "resumed" else None
        with pytest.warns(UserWarning, match="sharded") if world > 1 else contextlib.nullcontext():
            trainer.train(resume_from_checkpoint=resume)
        full = trainer.accelerator.get_state_dict(trainer.model)  # a collective under FSDP
        results[run] = {
            "mec": [e["mec/loss"] for e in trainer.state.log_history if "mec/loss" in e],
            "sharded": sorted(type(p).__name__ for p in trainer.model.parameters()),
            "state": {k: v.detach().clone() for k, v in full.items()} if rank == 0 else {},
        }
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "result.pt"))
    if world > 1:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_trainer_with_accelerate_fsdp2_equals_one_process_and_resumes(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    mp.spawn(_trainer_run, args=(1, _free_port(), str(one)), nprocs=1, join=True)
    mp.spawn(_trainer_run, args=(2, _free_port(), str(two)), nprocs=2, join=True)
    a = torch.load(one / "result.pt", weights_only=True)
    b = torch.load(two / "result.pt", weights_only=True)
    assert set(b["straight"]["sharded"]) == {"DTensor"} and "DTensor" not in a["straight"]["sharded"]
    assert (two / "straight" / "checkpoint-1" / "mec_quant_train_config.json").exists()
    for run in ("straight", "resumed"):
        assert len(a[run]["mec"]) == len(b[run]["mec"]) and all(v != 0 and v == v for v in b[run]["mec"]), run
        assert a[run]["mec"] == pytest.approx(b[run]["mec"], rel=1e-5), run
        assert a[run]["state"].keys() == b[run]["state"].keys(), run
        diffs = {k: (v.float() - b[run]["state"][k].float()).abs().max().item() for k, v in a[run]["state"].items()}
        assert max(diffs.values()) < 1e-5, (run, sorted(diffs.items(), key=lambda kv: -kv[1])[:3])
    # resumed from checkpoint-1, the run ends where the uninterrupted one did
    ends = {k: (v - b["resumed"]["state"][k]).abs().max().item() for k, v in b["straight"]["state"].items()}
    assert max(ends.values()) < 1e-6, sorted(ends.items(), key=lambda kv: -kv[1])[:3]
    # the final save: FSDP2's gathered checkpoint converts to the same int model as one process's
    from mec_quant_plugin import convert_checkpoint, from_pretrained

    ids = _global_batch()["input_ids"]
    converted = {}
    for name, folder in (("one", one), ("two", two)):
        model = from_pretrained(convert_checkpoint(folder / "straight" / "checkpoint-2", tmp_path / f"{name}-int"))
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        codes = {n: m.weight.qdata for n, m in model.named_modules() if hasattr(getattr(m, "weight", None), "qdata")}
        converted[name] = (logits, codes)
    (la, ca), (lb, cb) = converted["one"], converted["two"]
    assert ca and ca.keys() == cb.keys() and all(torch.equal(ca[n], cb[n]) for n in ca)
    torch.testing.assert_close(lb, la, atol=1e-5, rtol=1e-5)
