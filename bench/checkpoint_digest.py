"""Cost of checkpoint checksums: save and load of a ~100 MB weights checkpoint (the engine's
``save_final`` / ``load_weights``) with the manifest (XXH3-128 of every file) vs without, alternating
in the same process; prints the times and the ratios with/without::

    .venv/bin/python bench/checkpoint_digest.py [--hidden 448 --layers 8 --reps 5 --dir /tmp/ckbench]

Without = the same calls with the manifest write (save) or the verification (load) switched off.
Loads clear the in-process record of verified checkpoints first, so every load hashes every file.
The data is on the file system of ``--dir`` (page cache warm after the first rep, as in a resume
right after a save).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=448)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()

    from cptscale.train import checkpoint as ck
    from cptscale.train.model import build_model
    from cptscale.train.parallel import setup_parallel, teardown_parallel

    h, layers = args.hidden, args.layers
    shape = {"name": f"d{h}l{layers}", "hidden": h, "layers": layers, "heads": max(1, h // 64), "ffn": 4 * h,
             "kv_heads": None}
    root = Path(args.dir or tempfile.mkdtemp(prefix="ckbench-"))
    spec = {"run_id": "bench", "shape": shape, "vocab_size": args.vocab}
    real_manifest, real_verify = ck.write_dir_manifest, ck.verify_checkpoint
    times: dict[str, list[float]] = {k: [] for k in ("save_with", "save_without", "load_with", "load_without")}
    try:
        setup_parallel(1, 1, 0)
        model = build_model(shape, args.vocab, 128)
        for rep in range(args.reps):
            for mode in ("with", "without") if rep % 2 == 0 else ("without", "with"):
                d = root / mode
                shutil.rmtree(d, ignore_errors=True)
                ck.write_dir_manifest = real_manifest if mode == "with" else (lambda *a, **k: {"files": {}})
                t0 = time.perf_counter()
                final = ck.save_final(d, 1, model, spec)
                times[f"save_{mode}"].append(time.perf_counter() - t0)
                ck._intact.clear()
                ck.verify_checkpoint = real_verify if mode == "with" else (lambda *a, **k: True)
                t0 = time.perf_counter()
                ck.load_weights(final, model)
                times[f"load_{mode}"].append(time.perf_counter() - t0)
        files = [p for p in (root / "with" / "final").rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in files)
        from cptscale.integrity import file_digest

        hashing = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            for p in files:
                file_digest(p)
            hashing.append(time.perf_counter() - t0)
    finally:
        ck.write_dir_manifest, ck.verify_checkpoint = real_manifest, real_verify
        teardown_parallel()
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"checkpoint: {size / 1e6:.1f} MB ({shape['name']}, vocab {args.vocab}), {args.reps} reps, median seconds")
    for op in ("save", "load"):
        w, wo = med[f"{op}_with"], med[f"{op}_without"]
        print(f"  {op}: with manifest {w:.3f} s, without {wo:.3f} s, ratio with/without {w / wo:.3f} "
              f"(+{(w - wo) * 1e3:.0f} ms)")
    hs = statistics.median(hashing)
    print(f"  hashing every file alone (page cache warm): {hs:.3f} s, {size / 1e6 / hs:.0f} MB/s")


if __name__ == "__main__":
    main()
