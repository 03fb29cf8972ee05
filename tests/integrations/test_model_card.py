"""The model card (README.md of a saved folder): a YAML header that survives hostile strings, per
layer group what is stored and how, links only to pages that exist, and a quantization section that
survives the Trainer's own `create_model_card()` / `push_to_hub()` (issue 10)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from testing_utils import TINY_MODELS, make_trainer, saveable_converted

from mec_quant_plugin import MECQuantConfig, quantization_report
from mec_quant_plugin.integrations import model_card
from mec_quant_plugin.report import quantization_groups

HOSTILE = "org/model: x\n---\nlicense: stolen\n# heading `tick` ```"


def _saved(tmp_path: Path, name: str = "resnet", run_info: dict | None = None, **bits) -> tuple[torch.nn.Module, Path]:
    model, _ = saveable_converted(name, MECQuantConfig(**(bits or {"weight_bits": 2, "act_bits": 4})), run_info=run_info)
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    return model, folder


def _code_blocks(card: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", card, flags=re.S | re.M)


def test_hostile_strings_round_trip_through_the_yaml_header(tmp_path):
    run_info = {"base_model": HOSTILE, "dataset": HOSTILE, "task": "image-classification", "repo_id": HOSTILE}
    _, folder = _saved(tmp_path, run_info=run_info)
    text = (folder / "README.md").read_text()
    data = ModelCard.load(folder / "README.md").data.to_dict()
    assert data["base_model"] == HOSTILE and data["datasets"] == [HOSTILE]
    assert "license" not in data and data["pipeline_tag"] == "image-classification"
    header = text.split("\n---\n", 1)[0].removeprefix("---\n")  # the first unindented '---' ends it
    assert yaml.safe_load(header) == data
    for block in _code_blocks(text):
        ast.parse(block)  # the repo id stays a string literal
    assert len(_code_blocks(text)) == 2
    assert "\n# heading" not in text  # the strings never start a Markdown line of their own


def test_card_states_what_every_layer_group_stores_gpt2(tmp_path):
    model, folder = _saved(tmp_path, "gpt2")
    card = (folder / "README.md").read_text()
    groups = quantization_groups(model)
    conv1d = [g for g in groups if "holding the 2-bit levels" in g.storage]
    assert conv1d and sum(len(g.names) for g in conv1d) == 8  # 2 blocks x (c_attn, c_proj, c_fc, mlp.c_proj)
    for group in groups:
        assert f"| {group.bits} | {len(group.names)} | {group.storage} |" in card
    report_lines = [line.split(" (", 1)[0] for line in quantization_report(model).splitlines() if " layers, " in line]
    assert report_lines == [f"{g.bits}: {len(g.names)} layers, {g.storage}".split(" (", 1)[0] for g in groups]
    assert "IntxUnpackedToInt8Tensor (one int8 byte per weight" not in card  # no blanket claim


def test_card_links_only_pages_that_exist(tmp_path, monkeypatch):
    model, folder = _saved(tmp_path)
    card = (folder / "README.md").read_text()
    assert "pypi.org" not in card and "](http" not in card  # the package declares no URL
    monkeypatch.setattr(model_card, "project_url", lambda: "https://example.org/mec-quant-plugin")
    model.save_pretrained(folder)
    assert "](https://example.org/mec-quant-plugin)" in (folder / "README.md").read_text()


def _trainer_section_survives(readme: Path) -> str:
    card = readme.read_text()
    assert card.count(model_card.SECTION_START) == 1 and card.count(model_card.SECTION_END) == 1
    assert "## MEC-Quant quantization" in card and "| W2A4 |" in card
    data = ModelCard(card).data.to_dict()
    assert {"mec-quant", "torchao", "qat"} <= set(data["tags"])
    return card


def test_card_survives_the_trainers_create_model_card(tmp_path):
    trainer, _, _ = make_trainer("llama", str(tmp_path / "run"), MECQuantConfig(weight_bits=2, act_bits=4))
    trainer.train()
    trainer.save_model()
    trainer.create_model_card(model_name="tiny-w2a4")
    trainer.create_model_card(model_name="tiny-w2a4")  # twice: still one section
    card = _trainer_section_survives(tmp_path / "run" / "README.md")
    assert "Training hyperparameters" in card  # the Trainer's own card is kept too


def test_card_survives_the_trainers_push_to_hub(tmp_path, monkeypatch):
    import huggingface_hub

    uploaded = {}

    def create_repo(self, repo_id, **kwargs):
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploaded["readme"] = (Path(folder_path) / "README.md").read_text()
        return None

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    trainer, _, _ = make_trainer("llama", str(tmp_path / "run"), MECQuantConfig(weight_bits=2, act_bits=4),
                                 hub_model_id="me/tiny-w2a4", hub_token="dummy")
    trainer.train()
    trainer.push_to_hub()
    card = _trainer_section_survives(tmp_path / "run" / "README.md")
    assert uploaded["readme"] == card


def test_update_model_card_leaves_a_plain_model_alone(tmp_path):
    model, _ = TINY_MODELS["resnet"]()
    readme = tmp_path / "README.md"
    readme.write_text("---\nlicense: mit\n---\n# theirs\n")
    model_card.update_model_card(model, readme)
    assert readme.read_text() == "---\nlicense: mit\n---\n# theirs\n"


@pytest.mark.parametrize("existing", [None, "---\nlicense: mit\ntags:\n- mine\n---\n# theirs\n\n## Training\n\nx\n"])
def test_update_model_card_merges_into_any_card(tmp_path, existing):
    model, _ = _saved(tmp_path)
    readme = tmp_path / "card" / "README.md"
    readme.parent.mkdir()
    if existing:
        readme.write_text(existing)
    model_card.update_model_card(model, readme)
    model_card.update_model_card(model, readme)
    card = readme.read_text()
    assert card.count(model_card.SECTION_START) == 1
    data = ModelCard.load(readme).data.to_dict()
    assert {"mec-quant", "torchao", "qat"} <= set(data["tags"])
    if existing:
        assert data["license"] == "mit" and "mine" in data["tags"]
        assert card.index("# theirs") < card.index(model_card.SECTION_START) < card.index("## Training")


def test_card_survives_the_mixins_create_model_card(tmp_path):
    import warnings

    from testing_utils import dataset_like, training_arguments
    from transformers import Trainer

    from mec_quant_plugin import MECQuantTrainerMixin

    class MECTrainer(MECQuantTrainerMixin, Trainer):
        pass

    model, batch = TINY_MODELS["llama"]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = MECTrainer(model=model, args=training_arguments(str(tmp_path / "run")),
                             train_dataset=dataset_like(batch), mec_config=MECQuantConfig(weight_bits=2, act_bits=4))
    trainer.train()
    trainer.save_model()
    trainer.create_model_card()
    _trainer_section_survives(tmp_path / "run" / "README.md")


@pytest.mark.parametrize("remote_card", [False, True])
def test_card_survives_model_push_to_hub(tmp_path, monkeypatch, remote_card):
    """`model.push_to_hub` writes the repo's card (or transformers' template) over the saved one."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    uploaded = {}

    def create_repo(self, repo_id, **kwargs):
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            if op.path_in_repo == "README.md":
                uploaded["readme"] = Path(op.path_or_fileobj).read_text()

    def load(repo_id, **kwargs):
        if remote_card:
            return ModelCard("---\nlicense: mit\n---\n# The owner's card\n\n## Notes\n\nkept\n")
        raise EntryNotFoundError("no README.md in the repo")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    monkeypatch.setattr(ModelCard, "load", staticmethod(load))
    model, _ = _saved(tmp_path)
    model.push_to_hub("me/resnet-w2a4", token="dummy")
    readme = tmp_path / "uploaded.md"
    readme.write_text(uploaded["readme"])
    card = _trainer_section_survives(readme)
    if remote_card:
        assert "# The owner's card" in card and "license: mit" in card
