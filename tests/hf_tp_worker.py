"""One rank of the TP=2 logits check (started by torchrun from tests/test_hf.py): loads an imported
checkpoint at TP=2 and writes the gathered full-vocabulary logits (rank 0)."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from cptscale.hf import mcore_logits
from cptscale.train.parallel import setup_parallel, teardown_parallel


def main(ckpt: str, tokens_path: str, out: str) -> None:
    setup_parallel(2, 1, 0)
    try:
        logits = mcore_logits(ckpt, torch.load(tokens_path))
        if dist.get_rank() == 0:
            torch.save(logits, out)
    finally:
        teardown_parallel()


if __name__ == "__main__":
    main(*sys.argv[1:4])
