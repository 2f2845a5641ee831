"""CPU benchmark: tokens/s of the engine's Megatron-Core GPTModel step vs a plain PyTorch LLaMA-style
model of the same shape, alternating steps in the same process. Aim: ratio >= 0.8.

    .venv/bin/python bench/train.py [--hidden 128 --layers 4 --heads 4 --seq 128 --batch 8 --steps 6]
"""

from __future__ import annotations

import os
import sys

# bench/tokenize.py would shadow the stdlib module when this file is run as a script
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
sys.modules.pop("tokenize", None)

import argparse  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402


class Block(nn.Module):
    def __init__(self, d: int, h: int, ffn: int) -> None:
        super().__init__()
        self.h = h
        self.n1, self.n2 = nn.RMSNorm(d, eps=1e-5), nn.RMSNorm(d, eps=1e-5)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.fc1 = nn.Linear(d, 2 * ffn, bias=False)
        self.fc2 = nn.Linear(ffn, d, bias=False)

    def forward(self, x, cos, sin):
        b, s, d = x.shape
        q, k, v = self.qkv(self.n1(x)).view(b, s, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d)
        x = x + self.proj(a)
        g, u = self.fc1(self.n2(x)).chunk(2, dim=-1)
        return x + self.fc2(F.silu(g) * u)


def _rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Plain(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, h: int, ffn: int, seq: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, h, ffn) for _ in range(layers))
        self.norm = nn.RMSNorm(d, eps=1e-5)
        self.out = nn.Linear(d, vocab, bias=False)
        hd = d // h
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        f = torch.outer(torch.arange(seq).float(), inv)
        f = torch.cat([f, f], dim=-1)
        self.register_buffer("cos", f.cos(), persistent=False)
        self.register_buffer("sin", f.sin(), persistent=False)

    def forward(self, tokens, labels):
        x = self.emb(tokens)
        for blk in self.blocks:
            x = blk(x, self.cos, self.sin)
        logits = self.out(self.norm(x))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=6)
    a = ap.parse_args()
    from cptscale.ladder import tiny_ffn
    from cptscale.train.engine import (
        build_optimizer,
        collate,
        run_microbatches,
        setup_parallel,
        teardown_parallel,
        wrap_ddp,
    )
    from cptscale.train.model import build_model, count_params

    ffn = tiny_ffn(a.hidden)
    shape = {"hidden": a.hidden, "layers": a.layers, "heads": a.heads, "ffn": ffn, "kv_heads": None}
    setup_parallel(1, 1, 0)
    try:
        meg = build_model(shape, a.vocab, a.seq)
        plain = Plain(meg.embedding.word_embeddings.weight.shape[0], a.hidden, a.layers, a.heads, ffn, a.seq)
        assert count_params(meg) == sum(p.numel() for p in plain.parameters()), "shapes differ"
        meg = wrap_ddp(meg, distributed_optimizer=False)  # exactly what the trainer runs
        opt_m = build_optimizer(meg, {"weight_decay": 0.1, "grad_clip": 1.0}, 1e-3)
        decay = [p for p in plain.parameters() if p.ndim >= 2]
        rest = [p for p in plain.parameters() if p.ndim < 2]
        opt_p = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                  lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
        g = torch.Generator().manual_seed(0)
        toks = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=g)
        items = [{"tokens": t[:-1], "labels": t[1:], "loss_mask": torch.ones(a.seq),
                  "position_ids": torch.arange(a.seq)} for t in toks]
        batch = collate(items)

        def step_meg():
            meg.zero_grad_buffer()
            opt_m.zero_grad()
            run_microbatches(meg, [batch], a.seq, a.batch, forward_only=False)
            meg.finish_grad_sync()
            opt_m.step()  # Megatron optimizer: global-norm clipping + AdamW

        def step_plain():
            opt_p.zero_grad(set_to_none=True)
            plain(toks[:, :-1], toks[:, 1:]).backward()
            torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
            opt_p.step()

        step_meg()
        step_plain()  # warm-up
        tm = tp_ = 0.0
        for _ in range(a.steps):
            t0 = time.perf_counter()
            step_meg()
            tm += time.perf_counter() - t0
            t0 = time.perf_counter()
            step_plain()
            tp_ += time.perf_counter() - t0
        ntok = a.batch * a.seq * a.steps
        print(f"params {count_params(meg):,}  shape d{a.hidden}l{a.layers} seq {a.seq} batch {a.batch} "
              f"threads {torch.get_num_threads()}")
        print(f"megatron-core engine : {ntok / tm:10.0f} tokens/s")
        print(f"plain pytorch        : {ntok / tp_:10.0f} tokens/s")
        print(f"ratio engine/plain   : {tp_ / tm:.3f}  (aim >= 0.8)")
    finally:
        teardown_parallel()


if __name__ == "__main__":
    main()
