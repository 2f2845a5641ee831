"""The model of a "CPT of an existing model" study (``source_model:``), read without loading its weights.

A study of this kind has no scratch ladder: its one size is the model's own shape, its tokenizer is the
model's own. :func:`describe` reads what planning needs (shape, architecture, vocabulary, tokenizer) from a
Hugging Face directory's ``config.json`` or a cptscale/Megatron checkpoint's ``state.json`` and refuses,
naming the field and the fix, what the study could not use: a missing directory, a model that is not of
the LLaMA family, a missing or foreign tokenizer. :func:`derived_sections` turns that into the config's
``ladder`` and ``tokenizer`` sections, which validation fills in before the schema runs, so every later
stage (plan, data, train, store) sees an ordinary study with one size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: the ladder size name of the model in run ids (``model-cpt-zh-r0.25-d2e5``)
SIZE = "model"
#: where the workflow imports the model (relative to the study dir): a cptscale checkpoint
CHECKPOINT = "model/checkpoint"
#: its evaluation as given, on every language of the study (``cptscale existing-model evaluate``)
EVAL = "model/eval.json"
#: the study kind's fit (``cptscale existing-model fit``), beside the other fits
FIT = "fits/existing.json"


class SourceModelError(ValueError):
    """A ``source_model`` the study cannot use; ``field`` is the config path to fix."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


@dataclass(frozen=True)
class SourceModel:
    path: Path  #: resolved model directory
    kind: str  #: "huggingface" | "checkpoint"
    shape: dict[str, Any]
    arch: dict[str, Any]
    vocab_size: int  #: embedding rows of the model
    tokenizer: Path
    tokenizer_vocab: int
    family: str


def _tokenizer_size(tok: Path) -> int:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(tok)).get_vocab_size(with_added_tokens=True)
    except Exception as exc:  # tokenizers raises its own Exception type for a bad file
        raise SourceModelError("source_model.tokenizer", f"{tok} does not load as a tokenizers tokenizer.json "
                               f"({exc}); give the model's fast tokenizer") from None


def describe(path: str | Path, tokenizer: str | Path | None = None, base: str | Path = ".") -> SourceModel:
    """The model at ``path`` (relative to ``base``, the config file's directory) and its tokenizer."""
    from cptscale.hf import HFError, model_from_config

    p = (Path(base) / path).resolve()
    if not p.is_dir():
        raise SourceModelError("source_model.path", f"{p} is not a directory; give a Hugging Face model directory "
                               "(config.json, *.safetensors, tokenizer.json) or a cptscale checkpoint dir")
    if (p / "config.json").is_file():
        try:
            shape, arch, vocab = model_from_config(json.loads((p / "config.json").read_text()), str(p / "config.json"))
        except (HFError, ValueError, KeyError, TypeError) as exc:
            raise SourceModelError("source_model.path", f"{exc}; CPT of an existing model needs a LLaMA-family "
                                   "model (Llama, Mistral, Qwen2)") from None
        if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
            raise SourceModelError("source_model.path", f"{p} has a config.json but no weights (*.safetensors); "
                                   "save the model with save_pretrained")
        kind, family = "huggingface", str(arch["family"])
    elif (p / "state.json").is_file():
        state = json.loads((p / "state.json").read_text())
        if "shape" not in state or "vocab_size" not in state:
            raise SourceModelError("source_model.path", f"{p}/state.json has no shape/vocab_size: give a weights "
                                   "checkpoint such as <checkpoint.dir>/final")
        if not (p / "manifest.json").is_file():
            raise SourceModelError("source_model.path", f"{p} has no manifest.json (an unfinished or damaged "
                                   "checkpoint); give a finished one")
        shape, arch, vocab = dict(state["shape"]), dict(state.get("arch") or {}), int(state["vocab_size"])
        kind, family = "checkpoint", str(arch.get("family") or "cptscale")
    else:
        raise SourceModelError("source_model.path", f"{p} has neither config.json (a Hugging Face model) nor "
                               "state.json (a cptscale checkpoint)")
    tok = (Path(base) / tokenizer).resolve() if tokenizer else p / "tokenizer.json"
    if not tok.is_file():
        raise SourceModelError("source_model.tokenizer", f"{tok} not found: the study tokenizes with the model's "
                               "own tokenizer; give source_model.tokenizer: <path to its tokenizer.json> (the "
                               "fast tokenizer; tokenizer.model alone is not read)")
    n_tok = _tokenizer_size(tok)
    if n_tok > vocab:
        raise SourceModelError("source_model.tokenizer", f"{tok} has {n_tok} tokens but the model's vocabulary is "
                               f"{vocab}: ids past the embedding would fail; give the model's own tokenizer")
    return SourceModel(p, kind, shape, arch, vocab, tok, n_tok, family)


def param_count(shape: dict[str, Any], arch: dict[str, Any], rows: int) -> tuple[int, int]:
    """(total, non-embedding) parameters of the model as Megatron-Core builds it from an imported
    checkpoint: the ladder's count of its shape (GQA, any head_dim, SwiGLU, norms), plus QKV biases,
    ``rows`` embedding rows and an output layer unless the embeddings are tied."""
    from cptscale.prune import PrunedShape  # the one shape type (head_dim may differ from hidden / heads)

    s = PrunedShape.from_dict(shape)
    bias = s.layers * (s.heads + 2 * s.query_groups) * s.head_dim if arch.get("qkv_bias") else 0
    body = s.params(rows, embeddings=False) + bias
    return body + rows * s.hidden * (1 if arch.get("tie_embeddings") else 2), body


def derived_sections(model: SourceModel, tokenizer_path: str) -> dict[str, Any]:
    """The ``ladder`` (one size: the model's shape) and ``tokenizer`` (the model's file) sections. The
    tokenizer's own vocabulary sizes the data stage; the model's (maybe larger, padded) embedding is
    the checkpoint's and goes into each run.json from it."""
    sh = model.shape
    custom = {"hidden": int(sh["hidden"]), "layers": int(sh["layers"]), "heads": int(sh["heads"]),
              "ffn": int(sh["ffn"]), "kv_heads": sh.get("kv_heads")}
    return {"ladder": {"sizes": [SIZE], "custom": {SIZE: custom}},
            "tokenizer": {"kind": "file", "path": tokenizer_path, "vocab_size": model.tokenizer_vocab}}


def tokenizer_path(cfg_source: Any) -> str:
    """The config's tokenizer path (relative to the config file like ``tokenizer.path``)."""
    return cfg_source["tokenizer"] if cfg_source.get("tokenizer") else str(Path(cfg_source["path"]) / "tokenizer.json")
