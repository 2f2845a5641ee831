"""Tiny random Hugging Face models built locally with ``transformers`` (no hub download), with a
byte-level BPE tokenizer trained here on a few lines: the inputs of the import/export tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

VOCAB = 320  # model rows; train_helpers' generated corpora use ids < 256, so CPT runs can use them
TOKENIZER_VOCAB = 300


def make_tokenizer(dest: Path, vocab: int = TOKENIZER_VOCAB) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from cptscale.data.tokenizer import EOD

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    lines = ["the quick brown fox jumps over the lazy dog", "hello world", "continual pre-training"] * 20
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOD],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(dest / "tokenizer.json"))
    return dest / "tokenizer.json"


def make_hf_model(dest: Path, family: str = "llama", seed: int = 0, **overrides: Any) -> Path:
    """A random ``family`` model (llama: GQA and RoPE base 5e5; qwen2: QKV biases and tied
    embeddings; mistral: head_dim != hidden / heads) saved with ``save_pretrained`` plus a tokenizer.
    Norm weights and biases are randomised too, so a mapping that drops or swaps them shows."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    common = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
              "eos_token_id": 0, "bos_token_id": 0}
    if family == "llama":
        cfg = LlamaConfig(**{**common, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
                             "rms_norm_eps": 1e-6, **overrides})
    elif family == "qwen2":
        cfg = Qwen2Config(**{**common, "tie_word_embeddings": True, "rms_norm_eps": 1e-6,
                             "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, **overrides})
    elif family == "mistral":
        cfg = MistralConfig(**{**common, "head_dim": 24, "sliding_window": 256, "rms_norm_eps": 1e-5, **overrides})
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dest))
    make_tokenizer(dest)
    return dest


#: config.json of the tiny LLaMA make_hf_model builds (for tests that only read a model directory)
LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB, "hidden_size": 64,
                "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 500000.0, "hidden_act": "silu"}


def make_model_dir(dest: Path, config: dict[str, Any] | None = None, tokenizer: bool = True) -> Path:
    """A model directory as validation reads it (config.json, a weights file, tokenizer.json) without
    building the model: for config checks, which never load weights."""
    import json

    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text(json.dumps(config or LLAMA_CONFIG))
    (dest / "model.safetensors").write_bytes(b"")
    if tokenizer:
        make_tokenizer(dest)
    return dest


def with_tiny_source_model(raw: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """A shipped study config of the existing-model kind points ``source_model.path`` at the user's model;
    tests point it at a tiny local model directory instead (other configs are returned unchanged)."""
    if "source_model" in raw:
        raw["source_model"]["path"] = str(make_model_dir(tmp / "source-model"))
    return raw


def fake_import(study_dir: Path, source_loss: float = 4.0) -> None:
    """What the existing-model workflow writes before planning its runs' run.json: the imported
    checkpoint's state.json and the model's evaluation as given (for planner tests without torch)."""
    import json

    ck = study_dir / "model" / "checkpoint"
    ck.mkdir(parents=True, exist_ok=True)
    shape = {"name": "hf-llama-d64l2", "hidden": 64, "layers": 2, "heads": 4, "ffn": 96, "kv_heads": 2}
    (ck / "state.json").write_text(json.dumps({"shape": shape, "vocab_size": VOCAB,
                                               "arch": {"family": "llama", "rope_theta": 500000.0}}))
    (study_dir / "model" / "eval.json").write_text(json.dumps(
        {"reference": {"lang": "en", "loss": source_loss, "by": "transformers"}}))
