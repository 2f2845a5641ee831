"""Generated English-like and Chinese-like documents for the data-stage benchmarks (no third-party text).

Shared by bench/tokenize_throughput.py and bench/index_memory.py (run as scripts, bench/ is on sys.path).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HAN = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]


def make_corpus(path: Path, mb: float, seed: int = 0, short: bool = False) -> int:
    """JSONL of documents of 2-20 KB (``short``: 60-140 bytes), two thirds English-like, one third
    Chinese-like."""
    r = random.Random(seed)
    words = ["".join(r.choice("etaoinshrdlucmfwypvbgkjqxz") for _ in range(r.randint(1, 9))) for _ in range(20000)]
    target, written, i = int(mb * 1e6), 0, 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < target:
            if short and i % 3 == 2:
                body = "，".join("".join(r.choices(HAN, k=r.randint(4, 8))) for _ in range(r.randint(2, 4))) + "。"
            elif short:
                body = " ".join(r.choices(words, k=r.randint(10, 25))) + "."
            elif i % 3 == 2:
                body = "，".join("".join(r.choices(HAN, k=r.randint(4, 20))) for _ in range(r.randint(60, 600))) + "。"
            else:
                body = " ".join(r.choices(words, k=r.randint(400, 3500))) + "."
            line = json.dumps({"text": f"{i} {body}"}, ensure_ascii=False) + "\n"
            fh.write(line)
            written += len(line.encode("utf-8"))
            i += 1
    return i
