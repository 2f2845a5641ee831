"""Benchmark: training tokens/s of a Megatron-Core GPTModel before and after structured pruning
(cptscale.prune), the same steps on both models, alternating in one process.

    .venv/bin/python bench/prune.py [--hidden 128 --layers 4 --heads 4 --seq 128 --batch 8 --steps 10
                                     --to-heads 2 --to-ffn 176 --to-layers 4]

Defaults: d128l4 (4 heads, ffn 352) pruned to half the heads and half the MLP channels, activation
importance on 2 calibration batches. Prints the median-step tokens/s of each, the speed-up (median
of paired adjacent steps, robust to a shared machine's load) and the ratio of training FLOPs per
token (cptscale.transfer's exact count) for comparison.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--to-heads", type=int, default=None, help="default: half the heads")
    ap.add_argument("--to-ffn", type=int, default=None, help="default: half the MLP channels")
    ap.add_argument("--to-layers", type=int, default=None, help="default: keep every layer")
    ap.add_argument("--importance", default="activation", choices=("activation", "weight"))
    a = ap.parse_args()

    from cptscale import prune as P
    from cptscale.ladder import tiny_ffn
    from cptscale.train.model import build_model, count_params
    from cptscale.train.parallel import setup_parallel, teardown_parallel

    ffn = tiny_ffn(a.hidden)
    shape = {"hidden": a.hidden, "layers": a.layers, "heads": a.heads, "ffn": ffn, "kv_heads": a.kv_heads}
    target = {"heads": a.to_heads or max(1, a.heads // 2), "ffn": a.to_ffn or ffn // 2,
              "layers": a.to_layers or a.layers}
    setup_parallel(1, 1, 0)
    try:
        big = build_model(shape, a.vocab, a.seq)
        g = torch.Generator().manual_seed(0)
        toks = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=g)
        tokens, labels = toks[:, :-1].contiguous(), toks[:, 1:].contiguous()
        pos = torch.arange(a.seq).expand(a.batch, a.seq).contiguous()
        mask = torch.triu(torch.ones(1, 1, a.seq, a.seq, dtype=torch.bool), diagonal=1)
        calib = [{"tokens": tokens, "position_ids": pos} for _ in range(2)]
        t0 = time.perf_counter()
        small, _plan = P.prune(big, target, importance=a.importance, batches=calib)
        t_prune = time.perf_counter() - t0

        def stepper(model):
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
            model.train()

            def step():
                opt.zero_grad(set_to_none=True)
                model(tokens, pos, mask, labels=labels).float().mean().backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
            return step

        step_big, step_small = stepper(big), stepper(small)
        step_big()
        step_small()  # warm-up
        tb, ts = [], []
        for i in range(a.steps):  # alternate, and alternate which goes first: both see the same load
            for which in ((0, 1) if i % 2 == 0 else (1, 0)):
                t0 = time.perf_counter()
                (step_big if which == 0 else step_small)()
                (tb if which == 0 else ts).append(time.perf_counter() - t0)
        ntok = a.batch * a.seq
        sb, ss = P.model_shape(big), P.model_shape(small)
        fb, fs = P.flops_per_token(sb, a.vocab, a.seq), P.flops_per_token(ss, a.vocab, a.seq)
        fbn = P.flops_per_token(sb, a.vocab, a.seq) - 6 * a.hidden * big.vocab_size
        fsn = P.flops_per_token(ss, a.vocab, a.seq) - 6 * a.hidden * small.vocab_size
        print(f"threads {torch.get_num_threads()}  seq {a.seq} batch {a.batch} vocab {a.vocab} steps {a.steps} "
              f"importance {a.importance}  prune took {t_prune:.2f} s")
        print(f"unpruned {sb.as_dict()}  params {count_params(big):,}")
        print(f"pruned   {ss.as_dict()}  params {count_params(small):,}")
        med = statistics.median
        print(f"unpruned : {ntok / med(tb):10.0f} tokens/s (median step)")
        print(f"pruned   : {ntok / med(ts):10.0f} tokens/s (median step)")
        print(f"speed-up : {med(b / s_ for b, s_ in zip(tb, ts, strict=True)):.3f}x median of paired steps, "
              f"{sum(tb) / sum(ts):.3f}x total time   (training FLOPs/token ratio {fb / fs:.3f}x, "
              f"without the output layer {fbn / fsn:.3f}x)")
    finally:
        teardown_parallel()


if __name__ == "__main__":
    main()
