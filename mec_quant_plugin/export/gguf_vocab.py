"""The tokenizer part of a GGUF file: what llama.cpp needs to tokenize and detokenize by itself.

Follows llama.cpp's `convert_hf_to_gguf.py` (`get_vocab_base`, `_set_vocab_gpt2`, BERT's
`set_vocab`): the token list in id order (ids the tokenizer lacks become `[PAD<i>]`, unused),
one type per token (normal / control / user-defined), merges and special token ids through
`gguf.SpecialVocab`. Byte-level BPE tokenizers are written as `gpt2` with a pre-tokenizer name
recognized by hashing the tokens of llama.cpp's check text (`BPE_PRE_HASHES`); WordPiece
tokenizers as `bert` (llama.cpp's "phantom space" form: `##x` -> `x`, `x` -> `▁x`).
"""

from __future__ import annotations

import json
import logging
import tempfile
from hashlib import sha256
from typing import Any

logger = logging.getLogger("mec_quant_plugin")

# llama.cpp's check text (convert_hf_to_gguf.py, get_vocab_base_pre): the sha256 of its token ids
# names the pre-tokenizer. Only the families this exporter targets are listed; others get
# "default" with a warning.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
BPE_PRE_HASHES = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}

# gguf.TokenType values (kept here so this module imports without gguf)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED = 1, 2, 3, 4, 5


def tokenizer_kind(tokenizer: Any) -> str:
    """'gpt2' (byte-level BPE) or 'bert' (WordPiece).

    Raises:
        ValueError: a slow tokenizer, or a model type llama.cpp is not given by this exporter.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"export_gguf needs a fast tokenizer (tokenizers library), got {type(tokenizer).__name__}.")
    spec = json.loads(backend.to_str())
    model_type = spec["model"]["type"]
    if model_type == "WordPiece":
        return "bert"
    if model_type == "BPE" and "ByteLevel" in json.dumps(spec.get("pre_tokenizer")):
        return "gpt2"
    raise ValueError(
        f"export_gguf writes byte-level BPE (Llama 3, SmolLM, GPT-2) and WordPiece (BERT) tokenizers; this one is "
        f"{model_type} with pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:120]}."
    )


def bpe_pre_name(tokenizer: Any) -> str:
    """llama.cpp's name of the tokenizer's pre-tokenizer, or 'default' (with a warning) if unknown."""
    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    name = BPE_PRE_HASHES.get(digest)
    if name is None:
        logger.warning(
            "export_gguf: pre-tokenizer not recognized (hash %s): written as 'default'. llama.cpp's own "
            "tokenization of text may then differ from the Hugging Face tokenizer (token ids fed directly "
            "are unaffected).",
            digest[:12],
        )
        return "default"
    return name


def vocab_tokens(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens in id order, padded to `vocab_size`, and their llama.cpp token types."""
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ValueError(
            f"The tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is {vocab_size}."
        )
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        token = reverse[i]
        if i in added:
            types.append(CONTROL if added[i].special else USER_DEFINED)
        else:
            types.append(NORMAL)
        tokens.append(token)
    return tokens, types


def add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, model_config: Any = None) -> str:
    """Write the tokenizer into `writer` (a `gguf.GGUFWriter`); returns the kind written."""
    import gguf

    kind = tokenizer_kind(tokenizer)
    tokens, types = vocab_tokens(tokenizer, vocab_size)
    writer.add_tokenizer_model(kind)
    if kind == "gpt2":
        writer.add_tokenizer_pre(bpe_pre_name(tokenizer))
    else:
        tokens = [
            t if ty == CONTROL else (t[2:] if t.startswith("##") else "\u2581" + t) for t, ty in zip(tokens, types)
        ]
        writer.add_token_type_count(getattr(model_config, "type_vocab_size", 1) or 1)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        if model_config is not None:
            model_config.to_json_file(f"{folder}/config.json")
        special = gguf.SpecialVocab(folder, load_merges=kind == "gpt2", n_vocab=vocab_size)
        special.add_to_gguf(writer, quiet=True)
    return kind
