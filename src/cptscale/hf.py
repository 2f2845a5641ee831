"""Hugging Face checkpoints in and out: ``cptscale import-hf`` and ``cptscale export-hf``.

Import turns a LLaMA-family ``transformers`` checkpoint (``LlamaForCausalLM``, ``MistralForCausalLM``,
``Qwen2ForCausalLM``) into a Megatron-Core distributed checkpoint of the form ``cptscale train``
writes (``state.json`` + ``model/``), so a CPT run, ``cptscale evaluate`` and ``export-hf`` load it
at any TP/PP that divides the shape (dist_checkpointing reshards). Export goes the other way and writes
``model.safetensors``, ``config.json`` and the tokenizer, for ``AutoModelForCausalLM.from_pretrained``.

The mapping (own code; the layout follows Megatron-Core's local GPT layer spec, the one this project
trains with on CPU):

* ``q/k/v_proj`` -> ``linear_qkv``, interleaved per query group: for each of the G KV heads, its
  H/G query heads, then its key head, then its value head (rows of ``head_dim``); biases (Qwen2) alike.
* ``gate_proj``/``up_proj`` -> ``linear_fc1`` = [gate; up] (Megatron's gated linear unit).
* ``o_proj`` -> ``linear_proj``, ``down_proj`` -> ``linear_fc2``, ``input_layernorm`` ->
  ``input_layernorm``, ``post_attention_layernorm`` -> ``pre_mlp_layernorm`` (the local spec keeps
  the norms as modules; the Transformer Engine spec folds them into ``linear_qkv``/``linear_fc1`` as
  ``layer_norm_weight``, which its own sharded-state-dict handles when a GPU run loads the checkpoint).
* embeddings, final norm and ``lm_head`` one to one (``lm_head`` absent when tied); the vocabulary is
  padded only where TP requires it (``vocab_divisor`` 1, :func:`cptscale.train.model.model_vocab`): a
  vocabulary that TP divides keeps its size, so the checkpoint reshards between such TP sizes and no
  padded logit joins the softmax.

What the ladder's architecture lacks (RoPE base, LLaMA-3 RoPE scaling, norm epsilon, QKV biases, tied
embeddings) goes into the checkpoint's ``arch`` (see :mod:`cptscale.train.model`). Anything the mapping
cannot reproduce exactly (other activations, attention/MLP output biases, other RoPE variants, partial
rotary) is refused with the config field that causes it.

Megatron-Bridge (NVIDIA's converter) is the maintained alternative on GPU clusters; version 0.3.1
requires Transformer Engine (CUDA) and mamba-ssm, which does not build without CUDA, so it cannot be
installed on a CPU machine. ``--converter bridge`` lets it fill the same model where it is installed
(:func:`fill_bridge`); the checkpoint is written the same way.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

#: Hugging Face architectures whose mapping is the LLaMA one up to QKV biases, tied embeddings and GQA.
FAMILIES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
_ARCH_OF_FAMILY = {v: k for k, v in FAMILIES.items()}
#: LLaMA-3 RoPE scaling as Megatron-Core implements it (only ``factor`` is a parameter there).
_MCORE_LLAMA3_SCALING = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class HFError(ValueError):
    """A Hugging Face checkpoint or config this converter cannot map exactly (message names the field)."""


# ------------------------------------------------------------------------------------------------
# config -> shape + arch
def read_config(src: str | Path) -> dict[str, Any]:
    """config.json of a Hugging Face model directory, as written (no hub access, no transformers)."""
    p = Path(src)
    cfg = p / "config.json" if p.is_dir() else p
    if not cfg.is_file():
        raise HFError(f"{cfg} not found: give a Hugging Face model directory (config.json + *.safetensors)")
    try:
        return json.loads(cfg.read_text())
    except ValueError as exc:
        raise HFError(f"{cfg} is not valid JSON: {exc}") from exc


def _rope(cfg: dict[str, Any], where: str) -> tuple[float, dict[str, float] | None]:
    """(RoPE base, LLaMA-3 scaling or None) from either config style: ``rope_parameters``
    (transformers 5) or ``rope_theta`` + ``rope_scaling`` (transformers 4)."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))) != 1.0:
        raise HFError(f"{where}: partial_rotary_factor != 1 is not supported (Megatron's rotary_percent is not mapped)")
    if kind == "default":
        return theta, None
    if kind == "llama3":
        got = {k: float(params.get(k, -1)) for k in _MCORE_LLAMA3_SCALING}
        if got != _MCORE_LLAMA3_SCALING:
            raise HFError(f"{where}: llama3 RoPE scaling {got} differs from Megatron-Core's fixed "
                          f"{_MCORE_LLAMA3_SCALING}; only the factor is configurable there")
        return theta, {"factor": float(params["factor"])}
    raise HFError(f"{where}: RoPE type {kind!r} is not supported (default and llama3 are); the logits would differ")


def model_from_config(cfg: dict[str, Any], where: str = "config.json") -> tuple[dict[str, Any], dict[str, Any], int]:
    """(shape, arch, vocab_size) of the Megatron model equal to this Hugging Face config."""
    archs = cfg.get("architectures") or []
    family = FAMILIES.get(archs[0]) if archs else {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}.get(
        cfg.get("model_type", ""))
    if family is None:
        raise HFError(f"{where}: architectures {archs or cfg.get('model_type')!r} not supported; supported: "
                      f"{', '.join(FAMILIES)} (LLaMA-family decoders)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise HFError(f"{where}: hidden_act {cfg['hidden_act']!r} not supported (SwiGLU needs silu)")
    if cfg.get("mlp_bias"):
        raise HFError(f"{where}: mlp_bias true is not supported (the gated MLP is mapped without biases)")
    if family != "qwen2" and cfg.get("attention_bias"):
        raise HFError(f"{where}: attention_bias true (biases on q/k/v and o_proj) is not supported; "
                      "only Qwen2-style q/k/v biases are mapped")
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    theta, scaling = _rope(cfg, where)
    # Mistral attends within sliding_window; Qwen2 only with use_sliding_window
    slides = family == "mistral" or (family == "qwen2" and cfg.get("use_sliding_window"))
    window = cfg.get("sliding_window") if slides else None
    shape: dict[str, Any] = {"name": f"hf-{family}-d{hidden}l{cfg['num_hidden_layers']}", "hidden": hidden,
                             "layers": int(cfg["num_hidden_layers"]), "heads": heads, "ffn": int(cfg["intermediate_size"]),
                             "kv_heads": kv if kv != heads else None}
    if head_dim * heads != hidden:
        shape["head_dim"] = head_dim
    vocab = int(cfg["vocab_size"])
    arch = {"family": family, "rope_theta": theta, "rope_scaling": scaling,
            "norm_eps": float(cfg.get("rms_norm_eps", 1e-6)), "qkv_bias": family == "qwen2",
            "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
            "vocab_divisor": 1, "hf_vocab_size": vocab,
            "max_position_embeddings": cfg.get("max_position_embeddings"), "sliding_window": window}
    return shape, arch, vocab


def _head_dim(shape: dict[str, Any]) -> int:
    return int(shape.get("head_dim") or shape["hidden"] // shape["heads"])


# ------------------------------------------------------------------------------------------------
# tensors: Hugging Face names <-> Megatron-Core (TP=1) names
def _interleave_qkv(q, k, v, shape: dict[str, Any]):
    """[q; k; v] (HF) -> Megatron's per-query-group [q_g; k_g; v_g] along dim 0 (weights or biases)."""
    import torch

    hd, heads = _head_dim(shape), int(shape["heads"])
    groups = int(shape.get("kv_heads") or heads)
    rest = q.shape[1:]
    qg = q.reshape(groups, heads // groups * hd, *rest)
    kg = k.reshape(groups, hd, *rest)
    vg = v.reshape(groups, hd, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)


def _split_qkv(qkv, shape: dict[str, Any]):
    """Inverse of :func:`_interleave_qkv`."""
    hd, heads = _head_dim(shape), int(shape["heads"])
    groups = int(shape.get("kv_heads") or heads)
    rest = qkv.shape[1:]
    per = heads // groups * hd
    g = qkv.reshape(groups, per + 2 * hd, *rest)
    return (g[:, :per].reshape(-1, *rest), g[:, per:per + hd].reshape(-1, *rest),
            g[:, per + hd:].reshape(-1, *rest))


def _pad_rows(t, rows: int):
    import torch

    if t.shape[0] == rows:
        return t
    if t.shape[0] > rows:
        raise HFError(f"embedding has {t.shape[0]} rows, more than the model's {rows}")
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def hf_to_mcore(get: Callable[[str], Any], shape: dict[str, Any], arch: dict[str, Any],
                rows: int) -> dict[str, Any]:
    """Megatron-Core (TP=1, one pipeline stage) state dict from Hugging Face tensors (``get(name)``);
    ``rows`` is the model's (padded) vocabulary."""
    import torch

    out = {"embedding.word_embeddings.weight": _pad_rows(get("model.embed_tokens.weight"), rows),
           "decoder.final_layernorm.weight": get("model.norm.weight")}
    if not arch.get("tie_embeddings"):
        out["output_layer.weight"] = _pad_rows(get("lm_head.weight"), rows)
    for i in range(int(shape["layers"])):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        att = h + "self_attn."
        out[m + "input_layernorm.weight"] = get(h + "input_layernorm.weight")
        out[m + "self_attention.linear_qkv.weight"] = _interleave_qkv(
            get(att + "q_proj.weight"), get(att + "k_proj.weight"), get(att + "v_proj.weight"), shape)
        if arch.get("qkv_bias"):
            out[m + "self_attention.linear_qkv.bias"] = _interleave_qkv(
                get(att + "q_proj.bias"), get(att + "k_proj.bias"), get(att + "v_proj.bias"), shape)
        out[m + "self_attention.linear_proj.weight"] = get(att + "o_proj.weight")
        out[m + "pre_mlp_layernorm.weight"] = get(h + "post_attention_layernorm.weight")
        out[m + "mlp.linear_fc1.weight"] = torch.cat([get(h + "mlp.gate_proj.weight"), get(h + "mlp.up_proj.weight")])
        out[m + "mlp.linear_fc2.weight"] = get(h + "mlp.down_proj.weight")
    return out


def mcore_to_hf(sd: dict[str, Any], shape: dict[str, Any], arch: dict[str, Any]) -> dict[str, Any]:
    """Hugging Face tensors from a Megatron-Core (TP=1, one stage) state dict; the vocabulary is cut
    back to ``arch.hf_vocab_size`` (an imported model's own) when given, else kept padded."""
    rows = arch.get("hf_vocab_size")
    emb = sd["embedding.word_embeddings.weight"]
    out = {"model.embed_tokens.weight": emb[:rows] if rows else emb,
           "model.norm.weight": sd["decoder.final_layernorm.weight"]}
    if not arch.get("tie_embeddings"):
        lm = sd["output_layer.weight"]
        out["lm_head.weight"] = lm[:rows] if rows else lm
    ffn = int(shape["ffn"])
    for i in range(int(shape["layers"])):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        att = h + "self_attn."
        out[h + "input_layernorm.weight"] = sd[m + "input_layernorm.weight"]
        q, k, v = _split_qkv(sd[m + "self_attention.linear_qkv.weight"], shape)
        out.update({att + "q_proj.weight": q, att + "k_proj.weight": k, att + "v_proj.weight": v})
        if arch.get("qkv_bias"):
            q, k, v = _split_qkv(sd[m + "self_attention.linear_qkv.bias"], shape)
            out.update({att + "q_proj.bias": q, att + "k_proj.bias": k, att + "v_proj.bias": v})
        out[att + "o_proj.weight"] = sd[m + "self_attention.linear_proj.weight"]
        out[h + "post_attention_layernorm.weight"] = sd[m + "pre_mlp_layernorm.weight"]
        fc1 = sd[m + "mlp.linear_fc1.weight"]
        out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = fc1[:ffn], fc1[ffn:]
        out[h + "mlp.down_proj.weight"] = sd[m + "mlp.linear_fc2.weight"]
    return {k: v.contiguous() for k, v in out.items()}


# ------------------------------------------------------------------------------------------------
# reading Hugging Face weights
def _weight_files(src: Path) -> list[Path]:
    st = sorted(src.glob("*.safetensors"))
    if st:
        return st
    bins = sorted(src.glob("pytorch_model*.bin"))
    if bins:
        return bins
    raise HFError(f"{src}: no *.safetensors or pytorch_model*.bin weight files")


class HFWeights:
    """Lazy access to a Hugging Face checkpoint's tensors by name; records which were used, so the
    import refuses a checkpoint with tensors it would silently drop."""

    def __init__(self, src: Path) -> None:
        import torch

        self._where: dict[str, Any] = {}
        self._bins: dict[Path, dict[str, Any]] = {}
        for f in _weight_files(src):
            if f.suffix == ".safetensors":
                from safetensors import safe_open

                h = safe_open(str(f), framework="pt")
                for k in h.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                    self._where[k] = h
            else:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                for k in sd:
                    self._where[k] = sd
        self.used: set[str] = set()
        self.src = src

    def __call__(self, name: str):
        h = self._where.get(name)
        if h is None:
            raise HFError(f"{self.src}: tensor {name!r} missing from the checkpoint's weight files")
        self.used.add(name)
        return h.get_tensor(name) if hasattr(h, "get_tensor") else h[name]

    def unused(self) -> list[str]:
        # rotary inverse frequencies are recomputed from the config, never weights
        return sorted(k for k in self._where if k not in self.used and not k.endswith("rotary_emb.inv_freq"))


# ------------------------------------------------------------------------------------------------
# Megatron-Core side
def _copy_into(model, sd: dict[str, Any], where: str) -> None:
    """Copy a full (TP=1) state dict into a built one-stage model; both key sets must be equal."""
    import torch

    own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or extra:
        raise HFError(f"{where}: mapping mismatch with the Megatron model: missing {missing[:5]}, extra {extra[:5]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, t in sd.items():
            dst = params[k] if k in params else own[k]
            if tuple(dst.shape) != tuple(t.shape):
                raise HFError(f"{where}: {k} has shape {tuple(t.shape)}, the model expects {tuple(dst.shape)}")
            dst.copy_(t.to(dst.dtype))


def _single_process(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` with Megatron's parallel state at TP=PP=1 in this process (one gloo rank)."""
    from cptscale.train.parallel import setup_parallel, teardown_parallel

    setup_parallel(1, 1, 0)
    try:
        return fn()
    finally:
        teardown_parallel()


def fill_native(model, src: Path, shape: dict[str, Any], arch: dict[str, Any], vocab: int) -> None:
    """This project's mapping: every tensor of the checkpoint used exactly once, shapes checked."""
    from cptscale.train.model import model_vocab

    weights = HFWeights(src)
    sd = hf_to_mcore(weights, shape, arch, model_vocab(vocab, 1, arch))
    left = weights.unused()
    if left:
        raise HFError(f"{src}: tensors the mapping does not use: {left[:8]} ({len(left)} in all): this is "
                      "not a plain LLaMA/Mistral/Qwen2 checkpoint")
    _copy_into(model, sd, str(src))


def fill_bridge(model, src: Path, shape: dict[str, Any], arch: dict[str, Any], vocab: int) -> None:
    """Megatron-Bridge's mapping, where it is installed (a GPU cluster with Transformer Engine): it
    streams the Hugging Face weights into the same GPTModel, which is then saved like a native import.
    Not exercised by this project's tests (Bridge cannot be installed without CUDA)."""
    if not bridge_available():
        raise HFError("--converter bridge: megatron-bridge is not installed (0.3.1 needs Transformer Engine and "
                      "mamba-ssm, i.e. CUDA); use the default --converter native")
    from megatron.bridge import AutoBridge

    AutoBridge.from_hf_pretrained(str(src)).load_hf_weights([model], hf_path=str(src))


def bridge_available() -> bool:
    try:
        import megatron.bridge  # noqa: F401
    except Exception:
        return False
    return True


CONVERTERS = {"native": fill_native, "bridge": fill_bridge}


def import_hf(src: str | Path, out: str | Path, *, seq_length: int | None = None,
              converter: str = "native") -> dict[str, Any]:
    """Convert the Hugging Face model in ``src`` into a cptscale/Megatron-Core checkpoint dir ``out``
    (written beside it and renamed into place); returns its state.json. Runs in this process at TP=PP=1
    (the checkpoint reshards at load), so it needs memory for one copy of the model in fp32."""
    from cptscale.train import checkpoint as ck
    from cptscale.train.model import build_model
    from cptscale.util import file_hash

    src, out = Path(src), Path(out)
    if out.exists():
        raise HFError(f"--out {out} exists; remove it or choose another path")
    cfg = read_config(src)
    shape, arch, vocab = model_from_config(cfg, str(src / "config.json"))
    tok = src / "tokenizer.json"
    if not tok.is_file():
        raise HFError(f"{src}: no tokenizer.json (the fast tokenizer); the study tokenizes with the model's own")
    from tokenizers import Tokenizer

    n_tok = Tokenizer.from_file(str(tok)).get_vocab_size(with_added_tokens=True)
    if n_tok > vocab:
        raise HFError(f"{tok} has {n_tok} tokens but config.json vocab_size is {vocab}: token ids past the "
                      "embedding would fail; the tokenizer does not belong to this model")
    seq = int(seq_length or min(int(arch.get("max_position_embeddings") or 4096), 4096))
    fill = CONVERTERS[converter]

    def convert() -> dict[str, Any]:
        model = build_model(shape, vocab, seq, arch=arch)
        fill(model, src, shape, arch, vocab)
        tmp_root = out.parent / f".{out.name}.import.tmp"
        if tmp_root.exists():
            shutil.rmtree(tmp_root)
        spec = {"run_id": f"hf:{src.resolve().name}", "shape": shape, "vocab_size": vocab, "config_hash": None,
                "out_dir": None}
        extra = {"arch": arch, "tokenizer": "tokenizer.json", "source": {
            "kind": "huggingface", "path": str(src.resolve()), "config_sha256": file_hash(src / "config.json"),
            "architecture": _ARCH_OF_FAMILY[arch["family"]], "converter": converter}}
        final = ck.save_final(tmp_root, 0, model, spec, extra=extra)
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, final / name)
        final.rename(out)
        shutil.rmtree(tmp_root, ignore_errors=True)
        return ck.read_state(out)

    return _single_process(convert)


def checkpoint_arch(state: dict[str, Any]) -> dict[str, Any]:
    return dict(state.get("arch") or {})


def load_mcore_state(ckpt: str | Path, seq_length: int = 128) -> tuple[dict[str, Any], dict[str, Any]]:
    """(TP=1 state dict, state.json) of any cptscale checkpoint (written at any TP/PP)."""
    from cptscale.train import checkpoint as ck
    from cptscale.train.model import build_model

    state = ck.read_state(ckpt)
    if "shape" not in state or "vocab_size" not in state:
        raise HFError(f"{ckpt}/state.json has no shape/vocab_size: export needs a weights checkpoint such as "
                      "<checkpoint.dir>/final (or a step_N written by a current cptscale)")

    def load() -> dict[str, Any]:
        model = build_model(state["shape"], int(state["vocab_size"]), seq_length, arch=checkpoint_arch(state))
        ck.load_weights(ckpt, model)
        return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}

    return _single_process(load), state


# ------------------------------------------------------------------------------------------------
# export
def hf_config(shape: dict[str, Any], arch: dict[str, Any], rows: int, special: dict[str, int | None],
              dtype: str = "float32") -> dict[str, Any]:
    """config.json of the Hugging Face model equal to this Megatron model."""
    from cptscale.train.model import resolve_arch

    a = resolve_arch(arch)
    family = arch.get("family") or ("qwen2" if a["qkv_bias"] else "llama")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(a["rope_theta"])}
    if a["rope_scaling"]:
        rope = {**rope, "rope_type": "llama3", "factor": float(a["rope_scaling"]["factor"]), **_MCORE_LLAMA3_SCALING}
    cfg: dict[str, Any] = {
        "architectures": [_ARCH_OF_FAMILY[family]], "model_type": family, "vocab_size": rows,
        "hidden_size": int(shape["hidden"]), "intermediate_size": int(shape["ffn"]),
        "num_hidden_layers": int(shape["layers"]), "num_attention_heads": int(shape["heads"]),
        "num_key_value_heads": int(shape.get("kv_heads") or shape["heads"]), "head_dim": _head_dim(shape),
        "hidden_act": "silu", "rms_norm_eps": float(a["norm_eps"]), "rope_parameters": rope,
        "rope_theta": float(a["rope_theta"]), "tie_word_embeddings": bool(a["tie_embeddings"]),
        "max_position_embeddings": int(arch.get("max_position_embeddings") or 4096),
        "bos_token_id": special.get("bos"), "eos_token_id": special.get("eos"), "pad_token_id": special.get("pad"),
        "dtype": dtype, "use_cache": True,
    }
    if family == "qwen2":
        cfg.update({"use_sliding_window": bool(arch.get("sliding_window")), "sliding_window": arch.get("sliding_window"),
                    "max_window_layers": int(shape["layers"])})
    elif family == "mistral":
        cfg["sliding_window"] = arch.get("sliding_window")
    else:
        cfg.update({"attention_bias": False, "mlp_bias": False})
    return cfg


def _tokenizer_special(tok_path: Path) -> dict[str, Any]:
    """EOS/BOS/PAD ids and names: the document separator the study trained with (the study tokenizer's
    EOD, or a model's own eos_token) is the EOS."""
    from cptscale.data.tokenizer import Tokenizer

    t = Tokenizer(tok_path)
    return {"eos": t.eod, "bos": t.eod, "pad": t.pad, "eos_token": t.eod_token,
            "pad_token": t.hf.id_to_token(t.pad) if t.pad is not None else None}


def _write_tokenizer(tok_path: Path, dest: Path, special: dict[str, Any]) -> None:
    shutil.copy2(tok_path, dest / "tokenizer.json")
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30, "clean_up_tokenization_spaces": False}
    for k in ("eos_token", "pad_token"):
        if special.get(k):
            cfg[k] = special[k]
    if special.get("eos_token"):
        cfg["bos_token"] = special["eos_token"]
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1) + "\n")


def find_tokenizer(ckpt: Path, state: dict[str, Any], spec_path: str | Path | None) -> Path:
    """The tokenizer of a checkpoint: its own copy (an imported model), else the run's (run.json)."""
    from cptscale.train.evaluate import find_spec
    from cptscale.util import read_json

    own = ckpt / str(state.get("tokenizer") or "tokenizer.json")
    if own.is_file():
        return own
    try:
        spec = read_json(spec_path or find_spec(ckpt))
    except (OSError, ValueError, FileNotFoundError) as exc:
        raise HFError(f"cannot find the tokenizer of {ckpt}: {exc}") from exc
    tok = spec.get("tokenizer")
    if not tok or not Path(tok).is_file():
        raise HFError(f"the run.json of {ckpt} names tokenizer {tok!r}, which is not a file; pass --tokenizer")
    return Path(tok)


def export_hf(ckpt: str | Path, out: str | Path, *, tokenizer: str | Path | None = None,
              spec_path: str | Path | None = None, dtype: str = "float32") -> dict[str, Any]:
    """Write ``out`` (safetensors, config.json, tokenizer) from a cptscale checkpoint; written to a temp
    dir beside ``out`` and renamed into place. Returns the config written."""
    import torch
    from safetensors.torch import save_file

    ckpt, out = Path(ckpt), Path(out)
    sd, state = load_mcore_state(ckpt)
    arch = checkpoint_arch(state)
    tok = Path(tokenizer) if tokenizer else find_tokenizer(ckpt, state, spec_path)
    special = _tokenizer_special(tok)
    tensors = mcore_to_hf(sd, state["shape"], arch)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    tensors = {k: v.to(torch_dtype) for k, v in tensors.items()}
    cfg = hf_config(state["shape"], arch, int(tensors["model.embed_tokens.weight"].shape[0]), special, dtype)
    tmp = out.parent / f".{out.name}.export.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps(
        {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}, indent=1) + "\n")
    if (tok.parent / "tokenizer_config.json").is_file():  # a model's own tokenizer keeps its own files
        for name in TOKENIZER_FILES:
            if (tok.parent / name).is_file():
                shutil.copy2(tok.parent / name, tmp / name)
    else:  # the study tokenizer: its EOD is the EOS
        _write_tokenizer(tok, tmp, special)
    (tmp / "cptscale.json").write_text(json.dumps(
        {"checkpoint": str(ckpt.resolve()), "run_id": state.get("run_id"), "step": state.get("step"),
         "shape": state["shape"], "arch": arch, "tokenizer": str(tok)}, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return cfg


# ------------------------------------------------------------------------------------------------
def hf_validation_loss(hf_dir: str | Path, prefix: str, seq_length: int, *, max_tokens: int | None = None,
                       micro_batch_size: int = 8) -> dict[str, Any]:
    """Mean token cross-entropy of the Hugging Face model itself (``transformers``, fp32) over a validation
    set, with exactly the windows and mask of :func:`cptscale.train.evaluate.evaluate_model`: the reference
    the init-sanity gate of a CPT run from an imported model compares against."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from cptscale.train.data import validation_tokens, validation_windows

    toks, _ = validation_tokens(prefix, max_tokens)
    tokens, labels, mask = validation_windows(toks, seq_length)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # where the Megatron model it is compared with runs
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).to(dev)
    model.eval()
    total, count = 0.0, 0.0
    with torch.no_grad():
        for a in range(0, len(tokens), micro_batch_size):
            t = torch.as_tensor(np.asarray(tokens[a:a + micro_batch_size]), dtype=torch.long, device=dev)
            lab = torch.as_tensor(np.asarray(labels[a:a + micro_batch_size]), dtype=torch.long, device=dev)
            m = torch.as_tensor(np.asarray(mask[a:a + micro_batch_size]), dtype=torch.float64, device=dev)
            logits = model(t).logits.float()
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab.reshape(-1), reduction="none")
            total += float((ce.double() * m.reshape(-1)).sum())
            count += float(m.sum())
    return {"loss": total / max(count, 1.0), "n_tokens": int(count)}


def mcore_logits(ckpt: str | Path, tokens):
    """Full-vocabulary logits of a checkpoint at the current Megatron parallel state (TP ranks gather
    their vocabulary shards); sets the state up at TP=1 when none is initialised."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from cptscale.train import checkpoint as ck
    from cptscale.train.model import build_model

    def run():
        state = ck.read_state(ckpt)
        tps = ps.get_tensor_model_parallel_world_size()
        toks = torch.as_tensor(tokens)
        model = build_model(state["shape"], int(state["vocab_size"]), toks.shape[1], tp=tps,
                            arch=checkpoint_arch(state))
        ck.load_weights(ckpt, model)
        model.eval()
        pos = torch.arange(toks.shape[1]).expand_as(toks)
        mask = torch.triu(torch.ones(1, 1, toks.shape[1], toks.shape[1], dtype=torch.bool), diagonal=1)
        with torch.no_grad():
            out = model(toks, pos, mask)  # [batch, seq, vocab / tp]
            full = gather_from_tensor_model_parallel_region(out) if tps > 1 else out
        return full[..., : int(state["vocab_size"])]

    if ps.model_parallel_is_initialized():
        return run()
    return _single_process(run)


# ------------------------------------------------------------------------------------------------
def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("import-hf", help="convert a LLaMA/Mistral/Qwen2 Hugging Face model into a "
                              "Megatron-Core checkpoint (loadable at any TP/PP)")
    p.add_argument("src", help="Hugging Face model directory (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--out", required=True, help="checkpoint dir to write (must not exist)")
    p.add_argument("--converter", choices=("native", "bridge"), default="native",
                   help="native: this project's mapping (CPU or GPU); bridge: Megatron-Bridge, where installed")
    p.set_defaults(func=_cmd_import)
    e = subparsers.add_parser("export-hf", help="write a checkpoint as a Hugging Face model directory "
                              "(safetensors, config.json, tokenizer)")
    e.add_argument("checkpoint", help="checkpoint dir (e.g. <checkpoint.dir>/final, or one written by import-hf), "
                   "or a run's done.json (its final checkpoint)")
    e.add_argument("--out", required=True, help="directory to write (replaced if it exists)")
    e.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the checkpoint's own, else its run's)")
    e.add_argument("--spec", default=None, help="run.json of the run that wrote the checkpoint (default: found)")
    e.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    e.set_defaults(func=_cmd_export)


def _cmd_import(args: argparse.Namespace) -> int:
    from cptscale.errors import CLIError
    from cptscale.train.checkpoint import CheckpointError

    try:
        state = import_hf(args.src, args.out, converter=args.converter)
    except (HFError, CheckpointError) as exc:
        raise CLIError(str(exc)) from exc
    sh = state["shape"]
    print(f"imported {args.src} ({state['source']['architecture']}, hidden {sh['hidden']}, {sh['layers']} layers, "
          f"{sh['heads']} heads, {sh.get('kv_heads') or sh['heads']} KV heads, vocab {state['vocab_size']}) -> {args.out}")
    return 0


def resolve_checkpoint_arg(path: str | Path, spec: str | Path | None) -> tuple[Path, Path | None]:
    """(checkpoint dir, run.json or None) of export-hf's CHECKPOINT: a checkpoint dir, or a run's
    done.json (its final checkpoint, and the run.json beside it): what the workflow rule passes."""
    p = Path(path)
    if p.is_file() and p.name == "done.json":
        from cptscale.util import read_json

        final = read_json(p).get("final_checkpoint")
        if not final:
            raise HFError(f"{p} records no final_checkpoint")
        run_json = p.parent / "run.json"
        return Path(final), Path(spec) if spec else (run_json if run_json.is_file() else None)
    if not p.is_dir():
        raise HFError(f"checkpoint {p} does not exist (give a checkpoint dir or a run's done.json)")
    return p, Path(spec) if spec else None


def _cmd_export(args: argparse.Namespace) -> int:
    from cptscale.data.sources import SourceError
    from cptscale.errors import CLIError
    from cptscale.train.checkpoint import CheckpointError

    try:
        ckpt, spec = resolve_checkpoint_arg(args.checkpoint, args.spec)
        cfg = export_hf(ckpt, args.out, tokenizer=args.tokenizer, spec_path=spec, dtype=args.dtype)
    except (HFError, CheckpointError, SourceError) as exc:  # SourceError: a tokenizer without EOD/eos
        raise CLIError(str(exc)) from exc
    print(f"exported {args.checkpoint} -> {args.out} ({cfg['architectures'][0]}, vocab {cfg['vocab_size']})")
    return 0

