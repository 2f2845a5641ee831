"""Training throughput: the engine's Megatron-Core GPTModel step vs a plain PyTorch LLaMA-style model of
the same shape, alternating steps in the same process.

CPU (aim: ratio >= 0.8). On CPU the engine runs under cpu_compat's device-rewriting TorchFunctionMode
(entered by ``setup_parallel``), which adds Python dispatch to every torch call; the plain baseline is
timed *outside* that mode (the honest ratio) and also inside it (what the old bench measured, biased
towards 1), and both ratios are printed::

    .venv/bin/python bench/train.py [--hidden 128 --layers 4 --heads 4 --seq 128 --batch 8 --steps 6]
    .venv/bin/python bench/train.py --hidden 256 --layers 4 --heads 4 --seq 256 --vocab 8192   # reference

GPU (when one is present): a ladder shape (default the paper's ``992M``) in bf16, both models on the
device, tokens/s and MFU with the engine's formula (``cptscale.train.engine.mfu``; peak from
``--peak-flops``, default H100 bf16 dense 989 TFLOP/s); then, with two GPUs, the engine alone at TP=2
under torchrun (the plain model has no tensor parallelism)::

    .venv/bin/python bench/train.py --gpu --size 992M --bf16 --seq 2048 --batch 4 --steps 10 [--tp2]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn


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
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


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
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=None, help="default 128 on CPU, 2048 on GPU")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step; default 8 on CPU, 4 on GPU")
    ap.add_argument("--vocab", type=int, default=None, help="default 4096 on CPU, 32000 on GPU")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per model; default 6 on CPU, 10 on GPU")
    ap.add_argument("--gpu", action="store_true", help="GPU mode (needs CUDA); implied when a GPU is present")
    ap.add_argument("--size", default=None, help="ladder size name (GPU default: 992M); replaces --hidden/--layers/--heads")
    ap.add_argument("--bf16", action="store_true", help="bf16 (engine: bf16 params + fp32 master weights; plain: "
                    "autocast with fp32 weights); GPU mode turns it on")
    ap.add_argument("--peak-flops", type=float, default=None, help="per-GPU peak for MFU (default: H100 bf16 dense)")
    ap.add_argument("--tp2", action="store_true", help="GPU: after the 1-GPU comparison, the engine at TP=2 under "
                    "torchrun (needs 2 GPUs)")
    ap.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)  # set by the --tp2 re-launch
    a = ap.parse_args()
    a.gpu = a.gpu or torch.cuda.is_available()
    if a.gpu and not torch.cuda.is_available():
        ap.error("--gpu: CUDA is not available")
    a.seq = a.seq or (2048 if a.gpu else 128)
    a.batch = a.batch or (4 if a.gpu else 8)
    a.vocab = a.vocab or (32000 if a.gpu else 4096)
    a.steps = a.steps or (10 if a.gpu else 6)
    a.bf16 = a.bf16 or a.gpu
    if a.size is None and a.gpu:
        a.size = "992M"
    return a


def _shape(a: argparse.Namespace) -> dict:
    from cptscale.ladder import get_shape, tiny_ffn

    if a.size:
        s = get_shape(a.size)
        if s.kv_heads not in (None, s.heads):
            raise SystemExit(f"--size {a.size}: grouped-query attention is not in the plain baseline")
        return {"name": s.name, "hidden": s.hidden, "layers": s.layers, "heads": s.heads, "ffn": s.ffn,
                "kv_heads": None}
    return {"name": f"d{a.hidden}l{a.layers}", "hidden": a.hidden, "layers": a.layers, "heads": a.heads,
            "ffn": tiny_ffn(a.hidden), "kv_heads": None}


def _sync(gpu: bool) -> None:
    if gpu:
        torch.cuda.synchronize()


def main() -> None:
    a = _args()
    from cptscale.train.engine import (
        DEFAULT_PEAK_FLOPS,
        build_optimizer,
        collate,
        mfu,
        run_microbatches,
        setup_parallel,
        teardown_parallel,
        wrap_ddp,
    )
    from cptscale.train.model import build_model, count_params

    shape = _shape(a)
    peak = a.peak_flops or DEFAULT_PEAK_FLOPS
    setup_parallel(a.tp, 1, 0)
    import torch.distributed as dist

    rank0 = dist.get_rank() == 0
    try:
        meg = build_model(shape, a.vocab, a.seq, tp=a.tp, bf16=a.bf16)
        n_total = count_params(meg)
        meg = wrap_ddp(meg, distributed_optimizer=a.gpu)  # exactly what the trainer runs
        opt_m = build_optimizer(meg, {"weight_decay": 0.1, "grad_clip": 1.0}, 1e-4, bf16=a.bf16,
                                distributed_optimizer=a.gpu)
        dev = torch.device("cuda", torch.cuda.current_device()) if a.gpu else torch.device("cpu")
        g = torch.Generator().manual_seed(0)
        toks = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=g)
        items = [{"tokens": t[:-1], "labels": t[1:], "loss_mask": torch.ones(a.seq),
                  "position_ids": torch.arange(a.seq)} for t in toks]
        batch = collate(items)
        toks = toks.to(dev)

        def step_meg():
            meg.zero_grad_buffer()
            opt_m.zero_grad()
            run_microbatches(meg, [batch], a.seq, a.batch, forward_only=False)
            meg.finish_grad_sync()
            opt_m.step()  # Megatron optimizer: global-norm clipping + AdamW

        ntok = a.batch * a.seq * a.steps
        head = (f"shape {shape['name']} (hidden {shape['hidden']}, layers {shape['layers']}, heads {shape['heads']}, "
                f"ffn {shape['ffn']}), params {n_total:,}{' per rank' if a.tp > 1 else ''}, seq {a.seq}, batch {a.batch}, vocab {a.vocab}, "
                f"{'bf16' if a.bf16 else 'fp32'}, {'GPU ' + torch.cuda.get_device_name() if a.gpu else 'CPU'}, "
                f"threads {torch.get_num_threads()}, world {dist.get_world_size()} (tp {a.tp})")
        if a.tp > 1:  # TP=2 re-launch: the engine alone
            step_meg()
            _sync(True)
            t0 = time.perf_counter()
            for _ in range(a.steps):
                step_meg()
            _sync(True)
            tm = time.perf_counter() - t0
            if rank0:
                print(head)
                print(f"megatron-core engine TP={a.tp}: {ntok / tm:10.0f} tokens/s, MFU "
                      f"{mfu(shape, a.vocab, a.seq, ntok / tm, dist.get_world_size(), peak, tp=a.tp):.3f}")
            return

        plain = Plain(meg.module.embedding.word_embeddings.weight.shape[0], shape["hidden"], shape["layers"],
                      shape["heads"], shape["ffn"], a.seq).to(dev)
        assert n_total == sum(p.numel() for p in plain.parameters()), "shapes differ"
        decay = [p for p in plain.parameters() if p.ndim >= 2]
        rest = [p for p in plain.parameters() if p.ndim < 2]
        opt_p = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                  lr=1e-4, betas=(0.9, 0.95), eps=1e-8, fused=a.gpu)
        def amp():
            return torch.autocast("cuda", dtype=torch.bfloat16) if a.gpu and a.bf16 else contextlib.nullcontext()

        def step_plain():
            opt_p.zero_grad(set_to_none=True)
            with amp():
                loss = plain(toks[:, :-1], toks[:, 1:])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
            opt_p.step()

        def outside_mode():
            if a.gpu:
                return contextlib.nullcontext()
            from cptscale.train import cpu_compat

            return cpu_compat.device_mode_suspended()

        def timed(fn, ctx=contextlib.nullcontext) -> float:
            _sync(a.gpu)
            t0 = time.perf_counter()
            with ctx():
                fn()
            _sync(a.gpu)
            return time.perf_counter() - t0

        step_meg()
        with outside_mode():
            step_plain()  # warm-up
        step_plain()
        tm = tp_out = tp_in = 0.0
        for _ in range(a.steps):  # alternate, so drifts in machine load hit all three alike
            tm += timed(step_meg)
            tp_out += timed(step_plain, outside_mode)
            if not a.gpu:
                tp_in += timed(step_plain)
        print(head)
        if a.gpu:
            print(f"megatron-core engine : {ntok / tm:10.0f} tokens/s  MFU {mfu(shape, a.vocab, a.seq, ntok / tm, 1, peak):.3f}")
            print(f"plain pytorch        : {ntok / tp_out:10.0f} tokens/s  MFU "
                  f"{mfu(shape, a.vocab, a.seq, ntok / tp_out, 1, peak):.3f}")
            print(f"ratio engine/plain   : {tp_out / tm:.3f}  (MFU against {peak:.3g} FLOP/s per GPU)")
            print(f"peak memory          : {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        else:
            print(f"megatron-core engine              : {ntok / tm:10.0f} tokens/s")
            print(f"plain pytorch (no compat mode)    : {ntok / tp_out:10.0f} tokens/s")
            print(f"plain pytorch (under compat mode) : {ntok / tp_in:10.0f} tokens/s")
            print(f"ratio engine/plain                : {tp_out / tm:.3f}  (aim >= 0.8; baseline outside the mode)")
            print(f"ratio, both under the compat mode : {tp_in / tm:.3f}  (the old, biased measure)")
    finally:
        teardown_parallel()
    if a.gpu and a.tp2:
        if torch.cuda.device_count() < 2:
            print("TP=2: skipped (one GPU)")
            return
        torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
        argv = [x for x in sys.argv[1:] if x != "--tp2"]
        subprocess.run([torchrun, "--standalone", "--nproc-per-node=2", os.path.abspath(__file__), *argv,
                        "--gpu", "--tp", "2"], check=True)


if __name__ == "__main__":
    main()
