"""Structured pruning of Megatron-Core GPT models, for IPLT-style "prune early, then train small" runs.

Issue 10 asks whether pruning decisions taken after a *little* training (Li, Zhao & Shang 2019, IPLT)
are as good for transformer pre-training and CPT as decisions taken after all of it. This module is
the engine-level capability: score units, pick the ones to keep, and build a **physically smaller**
``GPTModel`` (new ``TransformerConfig``, kept weights copied exactly), so training after a prune
really is cheaper. The trainer (``cptscale.train.engine``) calls it at the prune events of a run spec.

Units
-----
* **attention heads, as whole query groups.** Megatron-Core 0.16.1 lays the fused ``linear_qkv``
  weight out per query group: rows ``[q_1 .. q_{h/g}, k, v]`` of ``head_dim`` each, group after group
  (``SelfAttention.get_query_key_value_tensors``); query head ``j`` of group ``g`` is head
  ``g*(h/g) + j`` of the attention output, i.e. columns ``head*head_dim ...`` of ``linear_proj``.
  Pruning removes whole groups, keeping the heads-per-group ratio (MHA: a group is one head).
  **head_dim is kept fixed** (``TransformerConfig.kv_channels`` of the original model), so pruning
  heads shrinks the QKV/projection widths but not the hidden size, and the softmax scale
  ``1/sqrt(head_dim)`` and the rotary embedding are unchanged. A pruned shape therefore carries
  ``head_dim`` explicitly (``hidden / heads`` no longer holds).
* **MLP channels.** ``linear_fc1`` is the fused SwiGLU ``[gate; up]`` (``torch.chunk(x, 2)`` in
  ``MLP``): channel ``c`` is row ``c`` and row ``ffn + c``; ``linear_fc2`` column ``c``.
* **whole layers** (optional). Layers are dropped from the residual stream; the kept ones keep their
  order. The hidden size (embedding channels) is never pruned.

Importance scores (``importance=``)
-----------------------------------
``"activation"`` (Minitron-style, Muralidharan et al. 2024; forward hooks on Megatron modules over a
few calibration batches, eval mode, no grad; token means over every position of every batch):

* query group: sum over its heads of mean_tokens ||o_head||_2, where ``o_head`` is the head's slice of
  the attention output entering ``self_attention.linear_proj`` (before the projection);
* MLP channel: mean_tokens |a_c|, where ``a = silu(gate) * up`` is the input of ``mlp.linear_fc2``;
* layer: mean_tokens (1 - cos(x_in, x_out)) of the block (Block Influence, ShortGPT, Men et al. 2024):
  a layer that hardly rotates the residual stream is the cheapest to drop.

``"weight"`` (data-free; L2 norms of the weight slices a unit owns):

* query group: ||its rows of linear_qkv (q, k, v)||_2 combined with ||its heads' columns of linear_proj||_2;
* MLP channel: ||gate row, up row, fc2 column||_2;
* layer: ||linear_proj||_2 combined with ||linear_fc2||_2, the weights that write into the residual
  stream. Crude (all layers look alike at initialisation); prefer ``activation`` for layers.

Activation scores are the default: they see the data and the current state of training, which is
exactly what IPLT's question is about. Heads and channels are ranked *within each layer* (every
layer keeps the same count, as one ``TransformerConfig`` requires); layers are ranked globally.
Ties break towards the lower index (stable sort), so a plan is deterministic.

Exactness
---------
``zero_pruned`` zeroes the pruned units in the unpruned model: a dropped query group's QKV rows and
projection columns, a dropped channel's gate/up rows and fc2 column, a dropped layer's
``linear_proj`` and ``linear_fc2`` (a pre-norm residual block with zero output projections is the
identity). The pruned model computes the same function as the zeroed one; its outputs differ only
by float round-off because the matmuls reduce over fewer terms in a different blocking order
(the test bounds the logits difference at 1e-5 in fp32, ~100 ulp at these magnitudes).

Scope
-----
TP=1 and PP=1 only (the pruned widths would have to be re-sharded; a clear ``PruneError`` otherwise).
Dense GPT with self-attention only: no MoE, MLA or gated attention output. Works with the local and
the Transformer-Engine layer specs (weights are matched by parameter name; fused layer-norm weights
are copied unchanged).

Why not NVIDIA Model Optimizer
------------------------------
``nvidia-modelopt`` 0.47.0 (a 2.2 MB pure-Python wheel on PyPI) has Minitron pruning for
Megatron-Core, but its Megatron plugin does ``import transformer_engine`` at module level (TE is
CUDA-only; there is no CPU build) and its layer pruning moves tensors with ``.cuda()``. It cannot
run on this project's CPU machines, where every test must pass, so it is not a dependency; the
pruning here is ~400 lines on Megatron-Core's own modules and is tested for exactness.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from cptscale.ladder import ModelShape

IMPORTANCE_KINDS = ("activation", "weight")


SHAPE_KEYS = ("hidden", "layers", "heads", "ffn", "kv_heads", "head_dim")


class PruneError(ValueError):
    """A pruning request that cannot be honoured (message names the field and the fix)."""


# shapes
@dataclass(frozen=True, init=False)
class PrunedShape(ModelShape):
    """A ladder shape after pruning: ``head_dim`` may differ from ``hidden / heads`` (head pruning keeps the
    head size while heads shrink). The same type as every shape, so parameter and FLOPs counts are
    :class:`cptscale.ladder.ModelShape`'s; only construction, checks and the dict form differ."""

    head_dim: int | None = None  # type: ignore[assignment]  #: None = hidden // heads (the unpruned convention)

    def __init__(self, hidden: int, layers: int, heads: int, ffn: int, kv_heads: int | None = None,
                 head_dim: int | None = None, name: str = "pruned") -> None:
        for k, v in (("name", name), ("hidden", hidden), ("layers", layers), ("heads", heads), ("ffn", ffn),
                     ("kv_heads", kv_heads), ("head_dim", head_dim)):
            object.__setattr__(self, k, v)
        self.__post_init__()

    def __post_init__(self) -> None:
        for k in ("hidden", "layers", "heads", "ffn"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise PruneError(f"shape.{k} must be an integer >= 1, got {v!r}")
        if self.head_dim is None:
            if self.hidden % self.heads:
                raise PruneError(f"shape: hidden {self.hidden} not divisible by heads {self.heads}; give head_dim")
            object.__setattr__(self, "head_dim", self.hidden // self.heads)
        if self.kv_heads is not None and (self.kv_heads < 1 or self.heads % self.kv_heads):
            raise PruneError(f"shape: heads {self.heads} not divisible by kv_heads {self.kv_heads}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrunedShape:
        return cls(int(d["hidden"]), int(d["layers"]), int(d["heads"]), int(d["ffn"]),
                   None if d.get("kv_heads") in (None, 0) else int(d["kv_heads"]),
                   None if d.get("head_dim") is None else int(d["head_dim"]))

    def as_dict(self) -> dict[str, int | None]:  # type: ignore[override]
        return {k: getattr(self, k) for k in SHAPE_KEYS}

    @property
    def heads_per_group(self) -> int:
        return self.heads // self.query_groups


def model_shape(model) -> PrunedShape:
    """The shape of a built GPTModel, read from its ``TransformerConfig``."""
    c = _unwrap(model).config
    groups = c.num_query_groups or c.num_attention_heads
    return PrunedShape(c.hidden_size, c.num_layers, c.num_attention_heads, c.ffn_hidden_size,
                       None if groups == c.num_attention_heads else groups, c.kv_channels)


def resolve_target(current: PrunedShape, target: dict[str, Any] | PrunedShape) -> PrunedShape:
    """Complete and check a target shape against the current one (no growth, same hidden and
    head_dim, same heads per query group)."""
    t = dict(target.as_dict()) if isinstance(target, PrunedShape) else dict(target)
    unknown = set(t) - set(SHAPE_KEYS) - {"name"}
    if unknown:
        raise PruneError(f"prune target: unknown field(s) {sorted(unknown)}; allowed: {list(SHAPE_KEYS)}")
    t.setdefault("hidden", current.hidden)
    if int(t["hidden"]) != current.hidden:
        raise PruneError(f"prune target: hidden {t['hidden']} != current {current.hidden}; the hidden size "
                         "(embedding channels) is not pruned, only heads, ffn and layers")
    if t.get("head_dim") is not None and int(t["head_dim"]) != current.head_dim:
        raise PruneError(f"prune target: head_dim {t['head_dim']} != current {current.head_dim}; "
                         "head_dim stays fixed when heads are pruned")
    for k in ("layers", "heads", "ffn"):
        t.setdefault(k, getattr(current, k))
    heads = int(t["heads"])
    hpg = current.heads_per_group
    if heads % hpg:
        raise PruneError(f"prune target: heads {heads} is not a multiple of the {hpg} query heads per group; "
                         "heads are pruned as whole query groups")
    groups = heads // hpg
    kv = t.get("kv_heads")
    if current.kv_heads is None and kv is None:
        kv_out = None
    else:
        if kv is not None and int(kv) != groups:
            raise PruneError(f"prune target: kv_heads {kv} inconsistent with heads {heads} at "
                             f"{hpg} heads per group (expected {groups})")
        kv_out = None if groups == heads else groups
    out = PrunedShape(current.hidden, int(t["layers"]), heads, int(t["ffn"]), kv_out, current.head_dim)
    for k in ("layers", "heads", "ffn"):
        if getattr(out, k) > getattr(current, k):
            raise PruneError(f"prune target: {k} {getattr(out, k)} > current {getattr(current, k)}; pruning "
                             "cannot grow a model")
    return out


def incremental_targets(start_shape: dict[str, Any] | PrunedShape, target_shape: dict[str, Any] | PrunedShape,
                        k: int) -> list[dict[str, int | None]]:
    """The k shapes of an incremental prune from ``start_shape`` to ``target_shape`` (the last is
    the target). Query groups, ffn and layers each shrink linearly (rounded to integers, so the
    sequence is monotone non-increasing); heads = groups x heads-per-group at every increment."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise PruneError(f"incremental_targets: k must be an integer >= 1, got {k!r}")
    start = start_shape if isinstance(start_shape, PrunedShape) else PrunedShape.from_dict(start_shape)
    end = resolve_target(start, target_shape)
    hpg = start.heads_per_group
    out = []
    for i in range(1, k + 1):
        def lerp(a: int, b: int, i: int = i) -> int:
            return a - round((a - b) * i / k)

        groups = lerp(start.query_groups, end.query_groups)
        out.append(PrunedShape(start.hidden, lerp(start.layers, end.layers), groups * hpg,
                               lerp(start.ffn, end.ffn), None if start.kv_heads is None else groups,
                               start.head_dim).as_dict())
    return out


# importance
@dataclass
class Importance:
    """Per-unit scores of one model (higher = more important)."""

    kind: str
    groups: Any  #: tensor [layers, query_groups]
    channels: Any  #: tensor [layers, ffn]
    layers: Any  #: tensor [layers]

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "groups": self.groups.tolist(), "channels": self.channels.tolist(),
                "layers": self.layers.tolist()}


def _unwrap(model):
    """The GPTModel inside DDP / Float16Module wrappers."""
    from megatron.core.models.gpt import GPTModel

    m = model
    for _ in range(4):
        if isinstance(m, GPTModel):
            return m
        m = getattr(m, "module", m)
    if not isinstance(m, GPTModel):
        raise PruneError(f"expected a Megatron-Core GPTModel (possibly wrapped), got {type(model).__name__}")
    return m


def check_prunable(model) -> None:
    c = _unwrap(model).config
    tp, pp = c.tensor_model_parallel_size, c.pipeline_model_parallel_size
    if tp != 1 or pp != 1 or (c.virtual_pipeline_model_parallel_size or 1) != 1:
        raise PruneError(f"structured pruning supports TP=1, PP=1 only (model has TP={tp}, PP={pp}); "
                         "prune at layout tp=1/pp=1 (the weights of the pruned model reshard when loaded)")
    if getattr(c, "num_moe_experts", None):
        raise PruneError("structured pruning does not support MoE models")
    if getattr(c, "multi_latent_attention", False):
        raise PruneError("structured pruning does not support multi-latent attention")
    if getattr(c, "attention_output_gate", False):
        raise PruneError("structured pruning does not support gated attention output")


def _layers(model):
    return list(_unwrap(model).decoder.layers)


def compute_importance(model, batches: list[dict[str, Any]] | None = None, kind: str = "activation") -> Importance:
    """Scores for every query group, MLP channel and layer. ``batches``: micro-batches with
    ``tokens`` and ``position_ids`` tensors [b, s] (the engine's ``collate`` output); required for
    ``activation``, ignored for ``weight``."""
    if kind not in IMPORTANCE_KINDS:
        raise PruneError(f"importance must be one of {IMPORTANCE_KINDS}, got {kind!r}")
    check_prunable(model)
    if kind == "weight":
        return _weight_importance(model)
    if not batches:
        raise PruneError("activation importance needs at least one calibration batch")
    return _activation_importance(model, batches)


def _weight_importance(model) -> Importance:
    import torch

    sh = model_shape(model)
    g, hpg, hd, f = sh.query_groups, sh.heads_per_group, sh.head_dim, sh.ffn
    gs, cs, ls = [], [], []
    with torch.no_grad():
        for layer in _layers(model):
            qkv = layer.self_attention.linear_qkv.weight.float()  # [g*(hpg+2)*hd, d]
            proj = layer.self_attention.linear_proj.weight.float()  # [d, h*hd]
            q2 = qkv.pow(2).sum(1).view(g, (hpg + 2) * hd).sum(1)
            p2 = proj.pow(2).sum(0).view(g, hpg * hd).sum(1)
            gs.append((q2 + p2).sqrt())
            fc1 = layer.mlp.linear_fc1.weight.float()  # [2f, d]
            fc2 = layer.mlp.linear_fc2.weight.float()  # [d, f]
            r = fc1.pow(2).sum(1)
            cs.append((r[:f] + r[f:] + fc2.pow(2).sum(0)).sqrt())
            ls.append((proj.pow(2).sum() + fc2.pow(2).sum()).sqrt())
    return Importance("weight", torch.stack(gs).cpu(), torch.stack(cs).cpu(), torch.stack(ls).cpu())


def _causal_mask(seq: int, dev):
    import torch

    return torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool, device=dev), diagonal=1)


class _ActivationStats:
    """Forward hooks on every layer that sum, over the tokens seen: each head's output norm (into the
    attention projection), each FFN channel's |activation| (into fc2) and the layer's 1 - cos(input, output)
    (its block importance)."""

    def __init__(self, layers: list[Any], sh: PrunedShape) -> None:
        import torch

        n = len(layers)
        self.heads, self.hd, self.f = sh.heads, sh.head_dim, sh.ffn
        self.head_sum = torch.zeros(n, sh.heads, dtype=torch.float64)
        self.chan_sum = torch.zeros(n, sh.ffn, dtype=torch.float64)
        self.bi_sum = torch.zeros(n, dtype=torch.float64)
        self.tok = torch.zeros(n, dtype=torch.float64)
        self.layer_in: dict[int, Any] = {}
        self.handles = []
        for i, layer in enumerate(layers):
            self.handles.append(layer.self_attention.linear_proj.register_forward_pre_hook(self._attn(i)))
            self.handles.append(layer.mlp.linear_fc2.register_forward_pre_hook(self._mlp(i)))
            self.handles.append(layer.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self.handles.append(layer.register_forward_hook(self._post(i), with_kwargs=True))

    def _attn(self, i: int) -> Any:
        def hook(mod, args):
            x = args[0].detach().float()  # [s, b, h*hd]
            self.head_sum[i] += x.reshape(-1, self.heads, self.hd).norm(dim=-1).sum(0).double().cpu()
        return hook

    def _mlp(self, i: int) -> Any:
        def hook(mod, args):
            x = args[0].detach().float()  # [s, b, f]
            self.chan_sum[i] += x.reshape(-1, self.f).abs().sum(0).double().cpu()
        return hook

    def _pre(self, i: int) -> Any:
        def hook(mod, args, kwargs):
            self.layer_in[i] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach()
        return hook

    def _post(self, i: int) -> Any:
        import torch.nn.functional as F

        def hook(mod, args, kwargs, out):
            y = (out[0] if isinstance(out, tuple) else out).detach().float()
            x = self.layer_in.pop(i).float()
            cos = F.cosine_similarity(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]), dim=-1)
            self.bi_sum[i] += (1.0 - cos).sum().double().cpu()
            self.tok[i] += cos.numel()
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def importance(self, g: int) -> Importance:
        """Per-token means: head scores summed per query group, channel and block scores."""
        n, heads = len(self.tok), self.heads
        count = self.tok.clamp(min=1)
        head_mean = self.head_sum / count[:, None]
        return Importance("activation", head_mean.view(n, g, heads // g).sum(-1).float(),
                          (self.chan_sum / count[:, None]).float(), (self.bi_sum / count).float())


def _activation_importance(model, batches: list[dict[str, Any]]) -> Importance:
    import torch

    gpt = _unwrap(model)
    sh = model_shape(gpt)
    stats = _ActivationStats(_layers(gpt), sh)
    was_training = gpt.training
    gpt.eval()
    try:
        with torch.no_grad():
            for b in batches:
                tokens = b["tokens"]
                gpt(tokens, b["position_ids"], _causal_mask(tokens.shape[1], tokens.device))
    finally:
        stats.remove()
        gpt.train(was_training)
    return stats.importance(sh.query_groups)


# plan, zeroing, physical pruning
@dataclass
class PrunePlan:
    """What to keep, in original indices: ``layers`` kept (ascending); per kept layer, the kept
    query ``groups`` and MLP ``channels`` (ascending)."""

    source: dict[str, int | None]
    target: dict[str, int | None]
    layers: list[int]
    groups: list[list[int]] = field(default_factory=list)
    channels: list[list[int]] = field(default_factory=list)
    importance: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _top(scores, k: int) -> list[int]:
    import torch

    order = torch.argsort(scores.double(), descending=True, stable=True)
    return sorted(int(i) for i in order[:k])


def plan_pruning(model, target: dict[str, Any] | PrunedShape, scores: Importance) -> PrunePlan:
    """Keep the top-scoring layers, then within each kept layer its top query groups and channels."""
    check_prunable(model)
    cur = model_shape(model)
    tgt = resolve_target(cur, target)
    if tuple(scores.groups.shape) != (cur.layers, cur.query_groups) or \
            tuple(scores.channels.shape) != (cur.layers, cur.ffn) or tuple(scores.layers.shape) != (cur.layers,):
        raise PruneError(f"importance scores do not match the model shape {cur.as_dict()}: compute them on this model")
    keep_layers = _top(scores.layers, tgt.layers)
    return PrunePlan(cur.as_dict(), tgt.as_dict(), keep_layers,
                     [_top(scores.groups[i], tgt.query_groups) for i in keep_layers],
                     [_top(scores.channels[i], tgt.ffn) for i in keep_layers], scores.kind)


def _head_index(groups: list[int], hpg: int) -> list[int]:
    return [g * hpg + j for g in groups for j in range(hpg)]


def _qkv_rows(groups: list[int], hpg: int, hd: int) -> list[int]:
    w = (hpg + 2) * hd
    return [g * w + r for g in groups for r in range(w)]


def _cols(units: list[int], width: int) -> list[int]:
    return [u * width + r for u in units for r in range(width)]


def zero_pruned(model, plan: PrunePlan) -> None:
    """Zero, in place, the units ``plan`` removes, so the model computes what the pruned one does."""
    import torch

    cur = model_shape(model)
    if cur.as_dict() != plan.source:
        raise PruneError(f"plan was made for shape {plan.source}, model has {cur.as_dict()}")
    hpg, hd, f = cur.heads_per_group, cur.head_dim, cur.ffn
    kept = dict(zip(plan.layers, zip(plan.groups, plan.channels, strict=True), strict=True))
    with torch.no_grad():
        for i, layer in enumerate(_layers(model)):
            att, mlp = layer.self_attention, layer.mlp
            if i not in kept:
                for lin in (att.linear_proj, mlp.linear_fc2):
                    lin.weight.zero_()
                    if getattr(lin, "bias", None) is not None:
                        lin.bias.zero_()
                continue
            groups, chans = kept[i]
            drop_g = sorted(set(range(cur.query_groups)) - set(groups))
            drop_c = sorted(set(range(f)) - set(chans))
            if drop_g:
                rows = torch.tensor(_qkv_rows(drop_g, hpg, hd))
                att.linear_qkv.weight[rows] = 0
                if getattr(att.linear_qkv, "bias", None) is not None:
                    att.linear_qkv.bias[rows] = 0
                att.linear_proj.weight[:, torch.tensor(_cols(_head_index(drop_g, hpg), hd))] = 0
            if drop_c:
                dc = torch.tensor(drop_c)
                rows = torch.cat([dc, dc + f])
                mlp.linear_fc1.weight[rows] = 0
                if getattr(mlp.linear_fc1, "bias", None) is not None:
                    mlp.linear_fc1.bias[rows] = 0
                mlp.linear_fc2.weight[:, dc] = 0


def build_like(model, shape: dict[str, Any] | PrunedShape):
    """A freshly initialised GPTModel with ``model``'s config, layer spec and embedding settings
    but another shape (heads/groups, ffn, layers; hidden and head_dim unchanged)."""
    gpt = _unwrap(model)
    check_prunable(gpt)
    cur = model_shape(gpt)
    tgt = shape if isinstance(shape, PrunedShape) else PrunedShape.from_dict({**cur.as_dict(), **dict(shape)})
    if tgt.hidden != cur.hidden or tgt.head_dim != cur.head_dim:
        raise PruneError(f"build_like: hidden/head_dim must stay {cur.hidden}/{cur.head_dim}, got "
                         f"{tgt.hidden}/{tgt.head_dim}")
    return build_gpt(gpt, tgt)


def build_gpt(template, shape: PrunedShape):
    """GPTModel of ``shape`` with every other setting taken from ``template`` (a GPTModel)."""
    from megatron.core.models.gpt import GPTModel

    c = template.config
    config = dataclasses.replace(c, num_layers=shape.layers, num_attention_heads=shape.heads,
                                 num_query_groups=shape.query_groups, ffn_hidden_size=shape.ffn,
                                 kv_channels=shape.head_dim)
    new = GPTModel(config=config, transformer_layer_spec=template.transformer_layer_spec,
                   vocab_size=template.vocab_size, max_sequence_length=template.max_sequence_length,
                   pre_process=template.pre_process, post_process=template.post_process,
                   parallel_output=template.parallel_output,
                   share_embeddings_and_output_weights=template.share_embeddings_and_output_weights,
                   position_embedding_type=template.position_embedding_type,
                   rotary_percent=template.rotary_percent, rotary_base=template.rotary_base)
    p = next(template.parameters())
    return new.to(device=p.device)


_LAYER_PREFIX = "decoder.layers."


def apply_plan(model, plan: PrunePlan):
    """The physically smaller GPTModel of ``plan``, with the kept weights copied exactly."""
    import torch

    gpt = _unwrap(model)
    cur = model_shape(gpt)
    if cur.as_dict() != plan.source:
        raise PruneError(f"plan was made for shape {plan.source}, model has {cur.as_dict()}")
    tgt = PrunedShape.from_dict(plan.target)
    new = build_gpt(gpt, tgt)
    hpg, hd, f = cur.heads_per_group, cur.head_dim, cur.ffn
    old = dict(gpt.named_parameters())
    old.update({k: v for k, v in gpt.named_buffers() if k not in old})
    with torch.no_grad():
        targets = list(new.named_parameters()) + list(new.named_buffers())
        for name, dst in targets:
            src_name, li = name, None
            if name.startswith(_LAYER_PREFIX):
                idx, rest = name[len(_LAYER_PREFIX):].split(".", 1)
                li = int(idx)
                src_name = f"{_LAYER_PREFIX}{plan.layers[li]}.{rest}"
            if src_name not in old:
                raise PruneError(f"apply_plan: {name} has no counterpart {src_name} in the source model")
            src = old[src_name].detach()
            if li is not None:
                groups, chans = plan.groups[li], plan.channels[li]
                if name.endswith("self_attention.linear_qkv.weight") or name.endswith("self_attention.linear_qkv.bias"):
                    src = src.index_select(0, torch.tensor(_qkv_rows(groups, hpg, hd), device=src.device))
                elif name.endswith("self_attention.linear_proj.weight"):
                    src = src.index_select(1, torch.tensor(_cols(_head_index(groups, hpg), hd), device=src.device))
                elif name.endswith("mlp.linear_fc1.weight") or name.endswith("mlp.linear_fc1.bias"):
                    c = torch.tensor(chans, device=src.device)
                    src = src.index_select(0, torch.cat([c, c + f]))
                elif name.endswith("mlp.linear_fc2.weight"):
                    src = src.index_select(1, torch.tensor(chans, device=src.device))
            if tuple(src.shape) != tuple(dst.shape):
                raise PruneError(f"apply_plan: do not know how to prune {name} {tuple(src.shape)} -> {tuple(dst.shape)}")
            dst.copy_(src)
    new.train(gpt.training)
    return new


def prune_model(model, target: dict[str, Any] | PrunedShape, scores: Importance):
    """Prune ``model`` to ``target`` (a shape dict: any of hidden, layers, heads, ffn, kv_heads,
    head_dim; missing keys stay as they are) using ``scores``; returns the new, smaller GPTModel."""
    return apply_plan(model, plan_pruning(model, target, scores))


def prune(model, target: dict[str, Any] | PrunedShape, *, importance: str = "activation",
          batches: list[dict[str, Any]] | None = None) -> tuple[Any, PrunePlan]:
    """Score, plan and apply in one call; returns (pruned model, plan)."""
    scores = compute_importance(model, batches, importance)
    plan = plan_pruning(model, target, scores)
    return apply_plan(model, plan), plan


def prune_events(start_shape: dict[str, Any] | PrunedShape, target_shape: dict[str, Any] | PrunedShape, k: int,
                 first_step: int, last_step: int) -> list[dict[str, Any]]:
    """The ``events`` of a run spec's ``prune`` key: the k shapes of :func:`incremental_targets` at
    steps spread evenly from ``first_step`` to ``last_step`` (both included; k = 1 uses ``first_step``)."""
    if not 0 <= first_step <= last_step:
        raise PruneError(f"prune_events: need 0 <= first_step {first_step} <= last_step {last_step}")
    shapes = incremental_targets(start_shape, target_shape, k)
    steps = [first_step + round((last_step - first_step) * i / (k - 1)) if k > 1 else first_step for i in range(k)]
    if len(set(steps)) != k:
        raise PruneError(f"prune_events: {k} events do not fit in steps {first_step}..{last_step}")
    return [{"step": st, "shape": sh} for st, sh in zip(steps, shapes, strict=True)]


def flops_per_token(shape: PrunedShape | dict[str, Any], vocab: int, seq_length: int) -> float:
    """:func:`cptscale.compute.flops_per_token` of a possibly pruned shape given as a dict or a shape."""
    from cptscale.compute import flops_per_token as fpt

    sh = shape if isinstance(shape, PrunedShape) else PrunedShape.from_dict(shape)
    return fpt(sh, vocab, seq_length)  # type: ignore[arg-type]


def compression(source: PrunedShape, target: PrunedShape, vocab: int) -> float:
    """Parameter compression ratio source/target (embeddings included)."""
    return source.params(vocab) / max(1, target.params(vocab))


__all__ = ["IMPORTANCE_KINDS", "Importance", "PruneError", "PrunePlan", "PrunedShape", "apply_plan",
           "build_like", "check_prunable", "compression", "compute_importance", "flops_per_token",
           "incremental_targets", "model_shape", "plan_pruning", "prune", "prune_events", "prune_model",
           "resolve_target",
           "zero_pruned"]
