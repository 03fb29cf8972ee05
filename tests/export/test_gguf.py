"""export_gguf: every quantized weight decodes (with gguf's own decoder) to exactly our codes x
fp16(scale), per GGUF type and bit-width; metadata and tokenizer read back; layers that cannot be
written exactly are refused by name (or re-quantized only when asked)."""

from __future__ import annotations

import functools
import json
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="export_gguf needs the `export` extra: pip install -e '.[export]'")

from mec_quant_plugin import GGUFExportError, MECQuantConfig, convert_model, export_gguf, prepare_model  # noqa: E402
from mec_quant_plugin.export.gguf import decode  # noqa: E402
from mec_quant_plugin.export.gguf_blocks import BLOCK_TYPES  # noqa: E402

HIDDEN, FFN, VOCAB, HEADS, KV_HEADS = 256, 256, 320, 4, 2


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE trained in memory (offline), the kind SmolLM2 / Llama 3 use."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog, again and again"] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def tiny_llama(tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=1,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg).eval()


def converted(**config) -> torch.nn.Module:
    """A converted tiny Llama (weights only); built once per config (exports do not change it)."""
    return _converted(tuple(sorted(config.items())))


@functools.cache
def _converted(config: tuple) -> torch.nn.Module:
    config = dict(config)
    model = tiny_llama(tie=config.pop("tie", True))
    return convert_model(prepare_model(model, MECQuantConfig(act_bits=None, **config)))


def expected_weight(weight) -> np.ndarray:
    """What the file must decode to: the torchao tensor's codes x fp16(scale), in float32."""
    rows, cols = weight.qdata.shape
    scale = weight.scale.float().reshape(rows, -1).half().float()
    zero = weight.zero_point.float().reshape(rows, -1)
    group = cols // scale.shape[1]
    return ((weight.qdata.float() - zero.repeat_interleave(group, 1)) * scale.repeat_interleave(group, 1)).numpy()


def rotary_rows(rows: int, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py LlamaModel.permute), written independently."""
    half = rows // heads // 2
    return np.array([h * 2 * half + j + s * half for h in range(heads) for j in range(half) for s in range(2)])


def check_exact(model, path) -> dict[str, str]:
    """Decode every quantized tensor of the file and compare with the model; returns name -> type."""
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    types = {}
    for name, gguf_name in [("model.embed_tokens", "token_embd"), ("lm_head", "output")] + [
        (f"model.layers.0.{hf}", f"blk.0.{g}")
        for hf, g in [
            ("self_attn.q_proj", "attn_q"),
            ("self_attn.k_proj", "attn_k"),
            ("self_attn.v_proj", "attn_v"),
            ("self_attn.o_proj", "attn_output"),
            ("mlp.gate_proj", "ffn_gate"),
            ("mlp.up_proj", "ffn_up"),
            ("mlp.down_proj", "ffn_down"),
        ]
    ]:
        if f"{gguf_name}.weight" not in tensors:
            assert name == "lm_head" and model.config.tie_word_embeddings
            continue
        t = tensors[f"{gguf_name}.weight"]
        weight = model.get_submodule(name).weight
        expected = expected_weight(weight)
        if gguf_name in ("blk.0.attn_q", "blk.0.attn_k"):
            expected = expected[rotary_rows(expected.shape[0], HEADS if gguf_name == "blk.0.attn_q" else KV_HEADS)]
        data = np.asarray(t.data)
        decoded = decode(gguf, data.reshape(expected.shape[0], -1), t.tensor_type.name)
        assert decoded.shape == expected.shape, name
        assert np.abs(decoded - expected).max() == 0.0, f"{name} ({t.tensor_type.name}) is not exact"
        types[name] = t.tensor_type.name
    return types


@pytest.mark.parametrize("name", sorted(BLOCK_TYPES))
def test_each_block_encoder_decodes_to_the_codes_with_ggufs_decoder(name):
    btype = BLOCK_TYPES[name]
    rng = np.random.default_rng(0)
    levels = [-1, 1] if btype.no_zero else list(range(btype.lo, btype.hi + 1))
    n = 16  # 16 blocks hold every level of every type (Q8_0: 256 levels, 32 per block)
    k = rng.choice(levels, size=(n, btype.block))
    k.reshape(-1)[: len(levels)] = levels  # every level, extremes included
    d = np.resize(np.array([0.01, -0.02, 3e-5, 1.5, 0.0, 6e4], dtype=np.float16), n)  # negative, tiny, zero, large
    blocks = btype.encode(k, d)
    assert blocks.shape == (n, btype.bytes_per_block)
    if name in gguf.GGMLQuantizationType.__members__:  # Q2_0: not in PyPI's gguf 0.19.0
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]] == (btype.block, btype.bytes_per_block)
    decoded = decode(gguf, blocks.reshape(1, -1), name).reshape(n, -1)
    assert np.array_equal(decoded, k * d.astype(np.float32)[:, None])


@pytest.mark.parametrize(
    ("config", "speed_type", "size_type"),
    [
        ({"weight_bits": 1}, "Q4_0", "Q1_0"),
        ({"weight_bits": 2, "ternary": True}, "Q4_0", "TQ1_0"),
        ({"weight_bits": 2}, "Q4_0", "TQ2_0"),
        ({"weight_bits": 3}, "Q4_0", "Q3_K"),
        ({"weight_bits": 4}, "Q4_0", "Q4_0"),
        ({"weight_bits": 4, "weight_granularity": "per_group", "group_size": 32}, "Q4_0", "Q4_0"),
        ({"weight_bits": 2, "weight_granularity": "per_group", "group_size": 256}, "Q4_0", "TQ2_0"),
        ({"weight_bits": 8}, "Q8_0", "Q8_0"),
    ],
    ids=["binary", "ternary", "int2", "int3", "int4", "int4-g32", "int2-g256", "int8"],
)
def test_every_quantized_weight_decodes_exactly(tmp_path, tokenizer, config, speed_type, size_type):
    model = converted(**config)
    for prefer, body_type in (("speed", speed_type), ("size", size_type)):
        result = export_gguf(model, tmp_path / f"{prefer}.gguf", tokenizer=tokenizer, prefer=prefer)
        types = check_exact(model, tmp_path / f"{prefer}.gguf")
        assert types["model.layers.0.mlp.down_proj"] == body_type, prefer
        assert types["model.embed_tokens"] == "Q8_0"  # edge layers (embedding = tied lm_head) are 8-bit
        assert not result.requantized and all(t.exact for t in result.tensors)


def test_metadata_tokenizer_and_tied_head_read_back(tmp_path, tokenizer):
    model = converted(weight_bits=2)
    result = export_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer)
    reader = gguf.GGUFReader(tmp_path / "m.gguf")

    def field(key):
        return reader.fields[key].contents()

    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == 1
    assert field("llama.embedding_length") == HIDDEN
    assert field("llama.feed_forward_length") == FFN
    assert field("llama.attention.head_count") == HEADS
    assert field("llama.attention.head_count_kv") == KV_HEADS
    assert field("llama.rope.dimension_count") == HIDDEN // HEADS
    assert field("llama.rope.freq_base") == pytest.approx(model.config.rope_parameters["rope_theta"])
    assert field("mec_quant.export") == "exact"
    assert field("tokenizer.ggml.model") == "gpt2"
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == VOCAB
    for token, i in tokenizer.get_vocab().items():
        assert tokens[i] == token
    assert tokens[len(tokenizer)] == f"[PAD{len(tokenizer)}]"
    assert field("tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert len(field("tokenizer.ggml.merges")) == len(merges) > 0
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names  # tied: llama.cpp uses token_embd
    assert {"token_embd.weight", "output_norm.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight"} <= names
    assert len(names) == len(result.tensors) == 11
    check_exact(model, tmp_path / "m.gguf")


def test_a_layer_that_cannot_be_written_exactly_is_refused_by_name(tmp_path, tokenizer):
    model = converted(weight_bits=2, weight_granularity="per_group", group_size=16)
    with pytest.raises(GGUFExportError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight .*group size 16"):
        export_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer)
    assert not list(tmp_path.iterdir())  # nothing left behind

    result = export_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer, requantize=True)
    assert len(result.requantized) == 7 and "model.layers.0.mlp.down_proj.weight" in result.requantized
    assert "RE-QUANTIZED" in result.summary()
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert reader.fields["mec_quant.export"].contents() == "requantized layers"
    assert reader.fields["mec_quant.requantized"].contents() == result.requantized


def test_a_forced_type_whose_block_spans_groups_with_different_steps_is_refused(tmp_path, tokenizer):
    model = converted(weight_bits=2, weight_granularity="per_group", group_size=32)
    with pytest.raises(GGUFExportError, match=r"TQ2_0 has one step per 256 weights, the layer has groups of 32"):
        export_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer, types={"*.mlp.*": "TQ2_0"})
    with pytest.raises(ValueError, match="allowed types are"):
        export_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer, types={"*": "Q9_9"})


def test_forced_q2_k_is_exact_for_per_channel_int2(tmp_path, tokenizer):
    model = converted(weight_bits=2, tie=False)
    export_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer, types={"model.layers.*": "Q2_K"})
    assert check_exact(model, tmp_path / "m.gguf")["model.layers.0.mlp.up_proj"] == "Q2_K"


def test_a_saved_folder_exports_with_its_own_tokenizer(tmp_path, tokenizer):
    from mec_quant_plugin import make_saveable

    config = MECQuantConfig(weight_bits=4, act_bits=None)
    model = convert_model(prepare_model(tiny_llama(), config))
    make_saveable(model, config)
    model.save_pretrained(tmp_path / "folder")
    tokenizer.save_pretrained(tmp_path / "folder")
    export_gguf(tmp_path / "folder", tmp_path / "m.gguf")
    check_exact(model, tmp_path / "m.gguf")


def test_an_existing_file_is_not_overwritten(tmp_path, tokenizer):
    (tmp_path / "m.gguf").write_text("mine")
    with pytest.raises(ValueError, match="overwrite=True"):
        export_gguf(converted(weight_bits=4), tmp_path / "m.gguf", tokenizer=tokenizer)
    assert (tmp_path / "m.gguf").read_text() == "mine"


def test_missing_gguf_names_the_extra(monkeypatch, tmp_path, tokenizer):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ImportError, match=r"mec-quant-plugin\[export\]"):
        export_gguf(torch.nn.Linear(2, 2), tmp_path / "m.gguf", tokenizer=tokenizer)


def check_all_exact(model, result) -> dict[str, str]:
    """Decode every quantized tensor the export wrote and compare with the model's codes x fp16(scale)."""
    reader = gguf.GGUFReader(result.path)
    tensors = {t.name: t for t in reader.tensors}
    types = {}
    for written in result.tensors:
        if written.gguf_type in ("F32", "F16"):
            continue
        weight = model.get_submodule(written.name.removesuffix(".weight")).weight
        expected = expected_weight(weight)
        data = np.asarray(tensors[written.gguf_name].data)
        decoded = decode(gguf, data.reshape(expected.shape[0], -1), written.gguf_type)
        assert np.abs(decoded - expected).max() == 0.0, f"{written.name} ({written.gguf_type}) is not exact"
        types[written.name] = written.gguf_type
    return types


@pytest.fixture(scope="module")
def wordpiece_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(
        ["the quick brown fox jumps over the lazy dog"] * 10,
        trainers.WordPieceTrainer(vocab_size=120, special_tokens=specials),
    )
    return BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def test_a_bert_encoder_exports_exactly_with_its_wordpiece_vocabulary(tmp_path, wordpiece_tokenizer, caplog):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=64,
        num_labels=3,
    )
    model = convert_model(
        prepare_model(BertForSequenceClassification(cfg).eval(), MECQuantConfig(weight_bits=4, act_bits=None))
    )
    result = export_gguf(model, tmp_path / "bert.gguf", tokenizer=wordpiece_tokenizer, pooling="cls")
    types = check_all_exact(model, result)
    assert types["bert.encoder.layer.0.attention.self.query.weight"] == "Q4_0"
    assert types["bert.embeddings.word_embeddings.weight"] == "Q8_0"
    assert "bert.pooler.dense.weight" in caplog.text and "classifier.weight" in caplog.text  # left out, said so
    reader = gguf.GGUFReader(tmp_path / "bert.gguf")
    assert reader.fields["general.architecture"].contents() == "bert"
    assert reader.fields["bert.attention.causal"].contents() is False
    assert reader.fields["bert.pooling_type"].contents() == 2
    assert reader.fields["tokenizer.ggml.model"].contents() == "bert"
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    vocab = wordpiece_tokenizer.get_vocab()
    assert tokens[vocab["[CLS]"]] == "[CLS]"
    word = next(t for t in vocab if t.isalpha() and len(t) > 2)
    piece = next(t for t in vocab if t.startswith("##"))
    assert tokens[vocab[word]] == "\u2581" + word and tokens[vocab[piece]] == piece[2:]  # llama.cpp's phantom space
    names = {t.name for t in reader.tensors}
    assert {
        "token_embd.weight",
        "position_embd.weight",
        "token_types.weight",
        "token_embd_norm.weight",
        "blk.0.attn_q.weight",
        "blk.0.attn_q.bias",
        "blk.0.attn_output_norm.weight",
        "blk.0.ffn_up.weight",
        "blk.0.ffn_down.weight",
        "blk.0.layer_output_norm.weight",
    } <= names


def test_a_model_still_fake_quantized_exports_the_same_tensors_as_converted(tmp_path, tokenizer):
    config = MECQuantConfig(weight_bits=3, act_bits=None)
    prepared = prepare_model(tiny_llama(), config)
    export_gguf(prepared, tmp_path / "prepared.gguf", tokenizer=tokenizer, prefer="size")
    export_gguf(convert_model(prepared), tmp_path / "converted.gguf", tokenizer=tokenizer, prefer="size")
    a, b = gguf.GGUFReader(tmp_path / "prepared.gguf"), gguf.GGUFReader(tmp_path / "converted.gguf")
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for x, y in zip(a.tensors, b.tensors):
        assert x.tensor_type == y.tensor_type and np.array_equal(np.asarray(x.data), np.asarray(y.data)), x.name


def test_steps_that_underflow_fp16_are_refused():
    from mec_quant_plugin.export.codes import codes_from_affine
    from mec_quant_plugin.export.gguf import _quantized_tensor

    qdata = torch.randint(-2, 2, (4, 64), dtype=torch.int8)
    lc = codes_from_affine("w", qdata, torch.full((4, 1), 1e-9), torch.zeros(4, 1), (1, 64), bits=2)
    assert not lc.source_exact
    with pytest.raises(GGUFExportError, match="w .*underflow"):
        _quantized_tensor(gguf, lc, ("Q4_0",), requantize=False)


def test_size_picks_q2_0_for_2_bit_rows_that_are_not_multiples_of_256():
    from mec_quant_plugin.export.codes import codes_from_affine
    from mec_quant_plugin.export.gguf import choose_type
    from mec_quant_plugin.export.gguf_blocks import SIZE_ORDER

    qdata = torch.randint(-2, 2, (8, 576), dtype=torch.int8)  # SmolLM2's hidden size: 576 = 9 x 64
    lc = codes_from_affine("w", qdata, torch.rand(8, 1) + 0.1, torch.zeros(8, 1), (1, 576), bits=2)
    btype, sign = choose_type(lc, SIZE_ORDER)
    assert (btype.name, sign) == ("Q2_0", -1)  # int2 [-2, 1] mirrored into Q2_0's [-1, 2]
    assert choose_type(lc, tuple(n for n in SIZE_ORDER if n != "Q2_0"))[0].name == "Q4_0"


def test_the_file_gets_the_permissions_of_any_new_file(tmp_path, tokenizer):
    export_gguf(converted(weight_bits=4), tmp_path / "m.gguf", tokenizer=tokenizer)
    (tmp_path / "plain").write_text("")
    assert (tmp_path / "m.gguf").stat().st_mode == (tmp_path / "plain").stat().st_mode
