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


def build_tokenizer(name: str = "bytes") -> Any:
    """'bytes' -> transformers' ByT5Tokenizer() (no files needed); otherwise AutoTokenizer from a folder or name.

    The returned tokenizer must define an EOS token: the packer separates documents with it.
    """
    if name == "bytes":
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
