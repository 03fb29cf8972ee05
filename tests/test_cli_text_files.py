""".txt files in the causal-LM path are one text, as in transformers' run_clm example: lines keep
their line ends, no end-of-text token is put after each line, the texts are concatenated and cut
into blocks; the held-out part is a contiguous stretch of lines, and the CLI says what it scores
(issue 10: an EOS after every line, newlines lost, a random 10% of the lines scored)."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest

from tests.test_cli import WORDS, last_json, run_cli

NEWLINE = "\n"


def save_line_tokenizer(folder: Path) -> dict[str, int]:
    """A word-level fast tokenizer with a token for the line end (no downloads); returns its vocabulary."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]", "[EOS]", NEWLINE, *sorted(set(WORDS))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(" ", "removed"),
                                                 pre_tokenizers.Split(Regex(NEWLINE), "isolated")])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]",
                            model_max_length=64).save_pretrained(folder)
    return vocab


@pytest.fixture
def tiny_llama_lines(tmp_path) -> tuple[Path, dict[str, int]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "tiny-llama-lines"
    vocab = save_line_tokenizer(folder)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=1, eos_token_id=2, bos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder, vocab


def write_lines(path: Path, n: int) -> list[str]:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(n)]
    path.write_text(NEWLINE.join(lines) + NEWLINE)
    return lines


def token_ids(lines: list[str], vocab: dict[str, int]) -> list[int]:
    return [vocab[t] for line in lines for t in [*line.split(" "), NEWLINE]]


def contains(stream: list[int], part: list[int]) -> bool:
    return any(stream[i:i + len(part)] == part for i in range(len(stream) - len(part) + 1))


def test_a_text_file_is_one_text_cut_into_blocks(tmp_path, tiny_llama_lines, caplog):
    from mec_quant_plugin.cli.arguments import DataArguments
    from mec_quant_plugin.cli.tasks import prepare_task

    model_dir, vocab = tiny_llama_lines
    lines = write_lines(tmp_path / "book.txt", 40)
    data = DataArguments(model=str(model_dir), dataset=str(tmp_path / "book.txt"), task="causal-lm", block_size=8)
    with caplog.at_level(logging.INFO, logger="mec_quant_plugin"):
        prepared = prepare_task("causal-lm", str(model_dir), data, seed=0)
    train = [t for block in prepared.train["input_ids"] for t in block]
    evals = [t for block in prepared.eval["input_ids"] for t in block]
    assert vocab["[EOS]"] not in train + evals  # no end-of-text token between the lines of one text
    # the held-out part is the first 10% of the lines (4 here), contiguous; training gets the rest, in order
    held_out, rest = token_ids(lines[:4], vocab), token_ids(lines[4:], vocab)
    assert evals == held_out[: len(held_out) // 8 * 8] and train == rest[: len(rest) // 8 * 8]
    assert train.count(vocab[NEWLINE]) >= 30  # line ends kept
    assert "first 4 of 40 lines" in prepared.eval_description
    assert prepared.eval_description in caplog.text and f"{len(evals)} tokens" in caplog.text


def test_documents_keep_an_end_of_text_token_between_them(tmp_path, tiny_llama_lines):
    import json

    from mec_quant_plugin.cli.arguments import DataArguments
    from mec_quant_plugin.cli.tasks import prepare_task

    model_dir, vocab = tiny_llama_lines
    lines = write_lines(tmp_path / "book.txt", 20)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": line}) + NEWLINE for line in lines))
    data = DataArguments(model=str(model_dir), dataset=str(tmp_path / "docs.jsonl"), task="causal-lm", block_size=8)
    prepared = prepare_task("causal-lm", str(model_dir), data, seed=0)
    assert vocab["[EOS]"] in [t for block in prepared.train["input_ids"] for t in block]
    assert "at random" in prepared.eval_description


def test_eval_of_a_text_file_says_what_it_scores(tmp_path, tiny_llama_lines, capsys, caplog):
    model_dir, _ = tiny_llama_lines
    write_lines(tmp_path / "book.txt", 40)
    argv = ["eval", "--model", model_dir, "--dataset", tmp_path / "book.txt", "--task", "causal-lm", "--block-size", "8"]
    with caplog.at_level(logging.INFO, logger="mec_quant_plugin"):
        assert run_cli(argv) == 0
        held_out = last_json(capsys.readouterr().out)
        assert "first 4 of 40 lines" in caplog.text and "--split" in caplog.text
        assert run_cli([*argv, "--split", "train"]) == 0
        whole = last_json(capsys.readouterr().out)
        assert "split 'train'" in caplog.text
    assert "first 4 of 40 lines" in held_out["evaluated_on"] and "split 'train'" in whole["evaluated_on"]
    assert held_out["eval_tokens"] == held_out["eval_samples"] * 7  # 7 predicted tokens per block of 8
    assert whole["eval_samples"] > held_out["eval_samples"]
