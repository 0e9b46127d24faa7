"""Tokenizers for the data pipeline: the file-free byte tokenizer, local folders, and one encode helper."""

from __future__ import annotations

from typing import Any

import numpy as np

from ringtrain.log import get_logger

logger = get_logger(__name__)

# ByT5's id layout: 0 pad, 1 eos, 2 unk, then byte b -> b + 3; ids 259..383 are unused extra ids.
BYTE_OFFSET = 3
# The byte tokenizer's chat template (it has no turn tokens): plain-text markers, each turn closed by '<|end|>' and a
# newline, which belong to the turn (an assistant turn's loss covers them, so a model learns where to stop).
BYTES_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def tokenizer_name(data_tokenizer: str, model_path: str | None) -> str:
    """data.tokenizer resolved against model.path: 'auto' is the model's own tokenizer when model.path is set (a
    folder holding tokenizer files, or a hub name), else 'bytes'; any other value is itself."""
    import os

    if data_tokenizer != "auto":
        return data_tokenizer
    if model_path and (not os.path.isdir(model_path) or
                       any(os.path.exists(os.path.join(model_path, f)) for f in TOKENIZER_FILES)):
        return model_path
    if model_path:
        logger.warning("data.tokenizer=auto: model.path=%s holds no tokenizer files: using the byte tokenizer (set "
                       "data.tokenizer to the model's tokenizer folder)", model_path)
    return "bytes"


def build_tokenizer(name: str = "bytes") -> Any:
    """'bytes' (or 'auto' without a model: see `tokenizer_name`) -> transformers' ByT5Tokenizer() (no files needed),
    with a chat template; otherwise AutoTokenizer from a folder or name.

    The returned tokenizer must define an EOS token: the packer separates documents with it.
    """
    if name in ("bytes", "auto"):
        from transformers import ByT5Tokenizer

        tok = ByT5Tokenizer()
        tok.chat_template = BYTES_CHAT_TEMPLATE
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer={name!r} has no EOS token; documents are separated by EOS when packing: "
                         "use a tokenizer that defines eos_token (or 'bytes')")
    logger.info("tokenizer %s: %d ids, eos=%d", name, len(tok), tok.eos_token_id)
    return tok


def is_byte_tokenizer(tokenizer: Any) -> bool:
    """True for ByT5-style byte tokenizers, which `encode` handles with a vectorised path."""
    return type(tokenizer).__name__ == "ByT5Tokenizer"


def encode(tokenizer: Any, text: str) -> np.ndarray:
    """Token ids of `text` without special tokens (no BOS/EOS: the packer adds EOS), as int32.

    For the byte tokenizer this is utf-8 bytes + 3, the mapping ByT5Tokenizer applies, computed without its
    per-character Python loop (and without turning literal '</s>' text into a control token).
    """
    if is_byte_tokenizer(tokenizer):
        return encode_bytes(text)
    return np.asarray(tokenizer.encode(text, add_special_tokens=False), dtype=np.int32)


def encode_bytes(text: str) -> np.ndarray:
    """ByT5 ids of `text`: its utf-8 bytes + 3, as int32."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + BYTE_OFFSET


def pad_id_of(tokenizer: Any) -> int:
    """The id used in padded slots (masked out of attention and loss, so any valid id works): pad, else EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
