"""Training throughput: the engine's Megatron-Core GPTModel step vs a plain PyTorch LLaMA-style model of
the same shape, alternating steps in the same process.

CPU (aim: ratio >= 0.95). On CPU the engine runs under cpu_compat's device-rewriting TorchFunctionMode
(entered by ``setup_parallel``), which adds Python dispatch to every torch call; the plain baseline is
timed *outside* that mode (the honest ratio) and also inside it (what the old bench measured, biased
towards 1), and both ratios are printed. Each ratio is the median of per-round ratios (a round runs
each model once, in rotating order, after 2 untimed warm-up rounds), printed with its spread: on a
shared 2-core machine the ratio of a few summed steps swung from 0.86 to 1.02 between runs::

    .venv/bin/python bench/train.py [--hidden 128 --layers 4 --heads 4 --seq 128 --batch 8 --steps 20]
    .venv/bin/python bench/train.py --hidden 256 --layers 4 --heads 4 --seq 256 --vocab 8192   # reference
    .venv/bin/python bench/train.py --threads 1 --clock cpu   # on a loaded machine: 1-thread CPU time

GPU (when one is present): a ladder shape (default the paper's ``992M``) in bf16, both models on the
device, tokens/s and MFU with the engine's formula (``cptscale.train.meter.mfu``; peak from
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

import numpy as np
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
    ap.add_argument("--steps", type=int, default=None, help="timed steps per model (after 2 untimed "
                    "warm-up steps); default 20 on CPU, 10 on GPU")
    ap.add_argument("--gpu", action="store_true", help="GPU mode (needs CUDA); implied when a GPU is present")
    ap.add_argument("--size", default=None, help="ladder size name (GPU default: 992M); replaces --hidden/--layers/--heads")
    ap.add_argument("--bf16", action="store_true", help="bf16 (engine: bf16 params + fp32 master weights; plain: "
                    "autocast with fp32 weights); GPU mode turns it on")
    ap.add_argument("--peak-flops", type=float, default=None, help="per-GPU peak for MFU (default: H100 bf16 dense)")
    ap.add_argument("--tp2", action="store_true", help="GPU: after the 1-GPU comparison, the engine at TP=2 under "
                    "torchrun (needs 2 GPUs)")
    ap.add_argument("--compile", action="store_true", help="also time the engine with its model under torch.compile "
                    "(speed-up over eager, loss difference)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="time steps by wall clock (default) or by "
                    "this process's CPU time: on a shared, loaded machine the wall time of a 2-thread step swings "
                    "by 10x with the scheduler, while 1-thread CPU time stays within a few %% (use --threads 1)")
    ap.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)  # set by the --tp2 re-launch
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.clock == "cpu" and a.gpu:
        ap.error("--clock cpu: CPU only (GPU steps are timed by the wall clock)")
    a.gpu = a.gpu or torch.cuda.is_available()
    if a.gpu and not torch.cuda.is_available():
        ap.error("--gpu: CUDA is not available")
    a.seq = a.seq or (2048 if a.gpu else 128)
    a.batch = a.batch or (4 if a.gpu else 8)
    a.vocab = a.vocab or (32000 if a.gpu else 4096)
    a.steps = a.steps or (10 if a.gpu else 20)
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


class Engine:
    """The trainer's own step: Megatron-Core GPTModel in Megatron's DDP, its optimizer (global-norm
    clipping + AdamW), forward/backward through Megatron's schedules."""

    def __init__(self, a: argparse.Namespace, shape: dict, compiled: bool = False) -> None:
        from cptscale.train.model import build_model, count_params
        from cptscale.train.parallel import seed_all
        from cptscale.train.step import build_optimizer, collate, wrap_ddp

        seed_all(0)  # the same initial weights for every Engine of a run (eager and compiled alike)
        model = build_model(shape, a.vocab, a.seq, tp=a.tp, bf16=a.bf16)
        self.n_params = count_params(model)
        if compiled:
            model.forward = torch.compile(model.forward)
        self.model = wrap_ddp(model, distributed_optimizer=a.gpu)  # exactly what the trainer runs
        self.opt = build_optimizer(self.model, {"weight_decay": 0.1, "grad_clip": 1.0}, 1e-4, bf16=a.bf16,
                                   distributed_optimizer=a.gpu)
        self.a = a
        self.batch = collate([{"tokens": t[:-1], "labels": t[1:], "loss_mask": torch.ones(a.seq),
                               "position_ids": torch.arange(a.seq)} for t in _tokens(a)])
        self.losses: list[float] = []

    def step(self) -> None:
        from cptscale.train.step import run_microbatches

        self.model.zero_grad_buffer()
        self.opt.zero_grad()
        s, c = run_microbatches(self.model, [self.batch], self.a.seq, self.a.batch, forward_only=False)
        self.model.finish_grad_sync()
        self.opt.step()
        self.losses.append(s / c)


def _tokens(a: argparse.Namespace) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=g)


def _plain_step(a: argparse.Namespace, shape: dict, vocab_rows: int, n_params: int):
    """The same step in plain PyTorch: SDPA attention, fused cross-entropy, torch AdamW."""
    dev = torch.device("cuda", torch.cuda.current_device()) if a.gpu else torch.device("cpu")
    plain = Plain(vocab_rows, shape["hidden"], shape["layers"], shape["heads"], shape["ffn"], a.seq).to(dev)
    assert n_params == sum(p.numel() for p in plain.parameters()), "shapes differ"
    decay = [p for p in plain.parameters() if p.ndim >= 2]
    rest = [p for p in plain.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8, fused=a.gpu)
    toks = _tokens(a).to(dev)

    def step():
        opt.zero_grad(set_to_none=True)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if a.gpu and a.bf16 else contextlib.nullcontext()
        with amp:
            loss = plain(toks[:, :-1], toks[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        opt.step()

    return step


def _outside_mode(gpu: bool):
    """The plain baseline runs outside cpu_compat's device-rewriting mode (the honest ratio)."""
    if gpu:
        return contextlib.nullcontext()
    from cptscale.train import cpu_compat

    return cpu_compat.device_mode_suspended()


def _alternate(fns: dict[str, tuple], steps: int, gpu: bool, warmup: int = 2,
               clock=time.perf_counter) -> dict[str, list[float]]:
    """Seconds per step for each name over ``steps`` rounds (``warmup`` untimed rounds first). Each
    round runs every fn once, in an order rotated from round to round, so a drift in machine load or a
    cache left warm by the fn before hits all alike. ``fns``: name -> (fn, context factory)."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + steps):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            fn, ctx = fns[name]
            _sync(gpu)
            t0 = clock()
            with ctx():
                fn()
            _sync(gpu)
            if i >= warmup:
                times[name].append(clock() - t0)
    return times


def _ratio(times: dict[str, list[float]], num: str, den: str) -> str:
    """``num``/``den`` time ratio: the median of the per-round ratios (each round's two steps ran next
    to each other, under the same load), their interquartile range and the ratio of the totals."""
    r = np.array(times[num]) / np.array(times[den])
    q1, med, q3 = np.percentile(r, [25, 50, 75])
    return (f"{med:.3f}  (median of {len(r)} rounds; IQR {q1:.3f}-{q3:.3f}, min-max {r.min():.3f}-{r.max():.3f}; "
            f"ratio of totals {sum(times[num]) / sum(times[den]):.3f})")


def _header(a: argparse.Namespace, shape: dict, n_params: int, world: int) -> str:
    return (f"shape {shape['name']} (hidden {shape['hidden']}, layers {shape['layers']}, heads {shape['heads']}, "
            f"ffn {shape['ffn']}), params {n_params:,}{' per rank' if a.tp > 1 else ''}, seq {a.seq}, batch "
            f"{a.batch}, vocab {a.vocab}, {'bf16' if a.bf16 else 'fp32'}, "
            f"{'GPU ' + torch.cuda.get_device_name() if a.gpu else 'CPU'}, threads {torch.get_num_threads()}, "
            f"world {world} (tp {a.tp}), load average {os.getloadavg()[0]:.1f}, "
            f"{'CPU time' if a.clock == 'cpu' else 'wall clock'}")


def _compare(a: argparse.Namespace, shape: dict) -> None:
    """Engine vs plain PyTorch (and, with --compile, the engine with its model under torch.compile)."""
    from cptscale.train.meter import DEFAULT_PEAK_FLOPS, mfu

    peak = a.peak_flops or DEFAULT_PEAK_FLOPS
    eng = Engine(a, shape)
    plain = _plain_step(a, shape, eng.model.module.embedding.word_embeddings.weight.shape[0], eng.n_params)
    none = contextlib.nullcontext
    fns = {"engine": (eng.step, none), "plain": (plain, lambda: _outside_mode(a.gpu))}
    if not a.gpu:
        fns["plain_in_mode"] = (plain, none)
    if a.compile:
        comp = Engine(a, shape, compiled=True)
        t0 = time.perf_counter()
        comp.step()  # compilation happens in the first call
        print(f"torch.compile: first (compiling) step {time.perf_counter() - t0:.1f} s")
        fns["compiled"] = (comp.step, none)
    t = _alternate(fns, a.steps, a.gpu, clock=time.process_time if a.clock == "cpu" else time.perf_counter)
    per_step = a.batch * a.seq
    tps = {k: per_step / float(np.median(v)) for k, v in t.items()}  # tokens/s at the median step time
    print(_header(a, shape, eng.n_params, 1))
    if a.gpu:
        print(f"megatron-core engine : {tps['engine']:10.0f} tokens/s  MFU "
              f"{mfu(shape, a.vocab, a.seq, tps['engine'], 1, peak):.3f}")
        print(f"plain pytorch        : {tps['plain']:10.0f} tokens/s  MFU "
              f"{mfu(shape, a.vocab, a.seq, tps['plain'], 1, peak):.3f}")
        print(f"ratio engine/plain   : {_ratio(t, 'plain', 'engine')}  (MFU against {peak:.3g} FLOP/s per GPU)")
        print(f"peak memory          : {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    else:
        print(f"megatron-core engine              : {tps['engine']:10.0f} tokens/s")
        print(f"plain pytorch (no compat mode)    : {tps['plain']:10.0f} tokens/s")
        print(f"plain pytorch (under compat mode) : {tps['plain_in_mode']:10.0f} tokens/s")
        print(f"ratio engine/plain                : {_ratio(t, 'plain', 'engine')}")
        print("                                    (aim >= 0.95; baseline outside the compat mode)")
        print(f"ratio, both under the compat mode : {_ratio(t, 'plain_in_mode', 'engine')}  (the old, biased measure)")
    if a.compile:
        diff = max(abs(x - y) for x, y in zip(eng.losses, comp.losses, strict=False))
        print(f"engine under torch.compile        : {tps['compiled']:10.0f} tokens/s, speed-up "
              f"{_ratio(t, 'engine', 'compiled')} over eager; max |loss diff| vs eager {diff:.3g} over "
              f"{min(len(eng.losses), len(comp.losses))} steps")


def _engine_alone(a: argparse.Namespace, shape: dict) -> None:
    """The TP=2 re-launch (one process per GPU under torchrun): the engine alone, tokens/s and MFU."""
    import torch.distributed as dist

    from cptscale.train.meter import DEFAULT_PEAK_FLOPS, mfu

    eng = Engine(a, shape)
    t = float(np.median(_alternate({"engine": (eng.step, contextlib.nullcontext)}, a.steps, True)["engine"]))
    ntok = a.batch * a.seq
    if dist.get_rank() == 0:
        print(_header(a, shape, eng.n_params, dist.get_world_size()))
        print(f"megatron-core engine TP={a.tp}: {ntok / t:10.0f} tokens/s, MFU "
              f"{mfu(shape, a.vocab, a.seq, ntok / t, dist.get_world_size(), a.peak_flops or DEFAULT_PEAK_FLOPS, tp=a.tp):.3f}")


def main() -> None:
    a = _args()
    from cptscale.train.parallel import setup_parallel, teardown_parallel

    shape = _shape(a)
    setup_parallel(a.tp, 1, 0)
    try:
        (_engine_alone if a.tp > 1 else _compare)(a, shape)
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
