"""Peak memory of the data stage on a large generated corpus (default 1 GB of text).

Generates English-like and Chinese-like documents (no third-party text), then runs the real commands
(`cptscale data ingest`, `cptscale data index`) as subprocesses and samples the peak RSS, PSS, USS and
anonymous memory of each process tree every 50 ms. Memory must not grow with corpus size: compare with a
smaller --mb. RSS/PSS/USS include library pages (torch), whose sharing with other processes moves them
by tens of MB; anonymous memory (heap, arrays, Arrow buffers) is what the data held costs.

    .venv/bin/python bench/index_memory.py --mb 1000 --workers 2
    .venv/bin/python bench/index_memory.py --mb 100            # the same figure for 10x less text
    .venv/bin/python bench/index_memory.py --mb 100 --short    # ~100-byte documents: per-document state
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from synthetic_corpus import make_corpus


def _anon(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_memory(cmd: list[str]) -> tuple[dict[str, int], float]:
    """Peak RSS, PSS, USS and anonymous memory (bytes) of the command's process tree, sampled every 50 ms,
    and seconds. RSS counts shared library pages once per process; PSS shares them out; USS is private
    memory; anon is heap and arrays only."""
    import psutil

    t0 = time.perf_counter()
    proc = psutil.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = {"rss": 0, "pss": 0, "uss": 0, "anon": 0}
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error, OSError):
            if proc.cmdline() == cmd:  # after exec: before it, the child still maps this process's memory
                procs = [proc, *proc.children(recursive=True)]
                infos = [p.memory_full_info() for p in procs]
                for k in ("rss", "pss", "uss"):
                    peak[k] = max(peak[k], sum(getattr(i, k) for i in infos))
                peak["anon"] = max(peak["anon"], sum(_anon(p.pid) for p in procs))
        time.sleep(0.05)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode()[-3000:]}")
    return peak, time.perf_counter() - t0


def _mib(peak: dict[str, int]) -> str:
    return ", ".join(f"{k.upper()} {v / 2**20:.0f} MiB" for k, v in peak.items())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=1000.0, help="MB of UTF-8 text to generate")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", help="work in this folder and keep it (default: a temp dir, removed)")
    ap.add_argument("--short", action="store_true", help="~100-byte documents (many documents per MB)")
    a = ap.parse_args()
    root = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="cptscale-mem-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        corpus = root / "corpus.jsonl"
        t = time.perf_counter()
        n_docs = make_corpus(corpus, a.mb, short=a.short)
        print(f"generated {corpus.stat().st_size / 1e6:.0f} MB, {n_docs:,} documents in {time.perf_counter() - t:.0f} s")
        src = root / "sources.json"
        src.write_text(json.dumps([{"name": "gen", "kind": "local", "paths": [str(corpus)], "format": "jsonl"}]))
        exe = [sys.executable, "-m", "cptscale.cli", "data"]
        docs = root / "xx" / "docs.parquet"
        pk_ing, s_ing = peak_memory([*exe, "ingest", "--lang", "xx", "--sources-json", str(src), "--out", str(docs),
                                  "--no-progress"])
        sample = root / "sample" / "docs.parquet"  # the tokenizer trains on a small sample (as in studies)
        small = root / "small.jsonl"
        with open(corpus, encoding="utf-8") as fin, open(small, "w", encoding="utf-8") as fout:
            size = 0
            for line in fin:  # the first ~3 MB
                fout.write(line)
                size += len(line)
                if size > 3_000_000:
                    break
        src2 = root / "sources2.json"
        src2.write_text(json.dumps([{"name": "gen", "kind": "local", "paths": [str(small)], "format": "jsonl"}]))
        subprocess.run([*exe, "ingest", "--lang", "xx", "--sources-json", str(src2), "--out", str(sample),
                        "--no-progress"], check=True, capture_output=True)
        tok = root / "tok" / "tokenizer.json"
        subprocess.run([*exe, "tokenizer", "--docs", str(sample), "--vocab-size", "4096", "--valid-tokens", "0",
                        "--out", str(tok), "--no-progress"], check=True, capture_output=True)
        pk_idx, s_idx = peak_memory([*exe, "index", "--lang", "xx", "--docs", str(docs), "--tokenizer", str(tok),
                                  "--valid-tokens", "1000000", "--out-dir", str(docs.parent), "--workers",
                                  str(a.workers), "--no-progress"])
        manifest = json.loads((docs.parent / "data.json").read_text())
        mb = manifest["train"]["bytes"] / 1e6
        print(f"ingest: peak {_mib(pk_ing)}, {s_ing:.0f} s, {manifest['ingest']['docs']:,} documents kept")
        print(f"index ({a.workers} workers, process tree): peak {_mib(pk_idx)}, {s_idx:.0f} s, "
              f"{mb / s_idx:.1f} MB/s, {manifest['train']['tokens']:,} train tokens")
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
