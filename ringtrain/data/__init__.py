"""The data pipeline: loading and tokenizing with datasets, packing, resumable sampling, passkey docs.

The pipeline functions (which import datasets / transformers) load lazily, so importing the package stays cheap for
spawned test workers. Its settings are `ringtrain.config.DataConfig`.
"""

from __future__ import annotations

from typing import Any

from ringtrain.data.loader import PackedDataLoader
from ringtrain.data.packing import IGNORE_INDEX, PackedDataset, document_position_ids, pack_documents
from ringtrain.data.passkey import PasskeyDocument, PasskeyGenerator, make_passkey_document

_LAZY = {
    "build_dataloader": "ringtrain.data.pipeline",
    "build_packed_dataset": "ringtrain.data.pipeline",
    "load_documents": "ringtrain.data.pipeline",
    "tokenize_documents": "ringtrain.data.pipeline",
    "build_tokenizer": "ringtrain.data.tokenizer",
}

__all__ = [
    "IGNORE_INDEX", "PackedDataLoader", "PackedDataset", "PasskeyDocument", "PasskeyGenerator",
    "document_position_ids", "make_passkey_document", "pack_documents", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ringtrain.data' has no attribute {name!r}")
