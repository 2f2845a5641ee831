"""``cptscale verify PATH``: check checkpoints and datasets against the digests recorded when they were
written (the full check; training starts do the fast one). PATH is one checkpoint, a run's checkpoint
dir, or a whole study dir (every checkpoint under ``checkpoints/`` and every dataset of ``data/``).
Exit status 1 if anything is damaged, so scripts and CI can gate on it."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

#: checkpoint dirs verify looks at inside a run's checkpoint dir (set-aside dirs are skipped)
_CHECKPOINT_NAME = re.compile(r"^(step_\d+|final)$")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("verify", help="check checkpoints and datasets against their recorded digests; "
                              "exit 1 naming each damaged file")
    p.add_argument("path", help="a checkpoint dir (step_N, final), a run's checkpoint dir, or a study dir "
                   "(results/<study>)")
    p.set_defaults(func=_cmd)


def find_checkpoints(path: Path) -> list[Path]:
    """The checkpoints under ``path``: itself, its ``step_N``/``final`` children, or those of every run
    under ``path/checkpoints``."""
    from cptscale.integrity import MANIFEST
    from cptscale.train.checkpoint import STATE

    def is_ckpt(p: Path) -> bool:
        return (p / STATE).is_file() or (p / MANIFEST).is_file()

    if is_ckpt(path):
        return [path]
    runs = sorted((path / "checkpoints").iterdir()) if (path / "checkpoints").is_dir() else [path]
    return [c for r in runs if r.is_dir() for c in sorted(r.iterdir())
            if c.is_dir() and _CHECKPOINT_NAME.match(c.name) and is_ckpt(c)]


def find_datasets(path: Path) -> list[str]:
    """The indexed-dataset prefixes listed by every ``data/<lang>/data.json`` of a study dir."""
    import json

    out = []
    for mpath in sorted((path / "data").glob("*/data.json")):
        try:
            m = json.loads(mpath.read_text())
        except (OSError, ValueError):
            out.append(str(mpath.parent / "train"))  # check_dataset then names the unreadable manifest
            continue
        out += [str(mpath.parent / n) for n in ("train", "valid") if n in m]
        out += [str(mpath.parent / f"train.{c}") for c in (m.get("train_corpora") or {})]
    return out


def _cmd(args: argparse.Namespace) -> int:
    from cptscale.errors import CLIError
    from cptscale.integrity import IntegrityError, check_dataset
    from cptscale.train.checkpoint import CheckpointError, verify_checkpoint

    path = Path(args.path)
    if not path.is_dir():
        raise CLIError(f"{path} is not a directory (give a checkpoint, a run's checkpoint dir or a study dir)")
    ckpts, datasets = find_checkpoints(path), find_datasets(path)
    if not ckpts and not datasets:
        raise CLIError(f"{path}: no checkpoint (state.json / manifest.json) and no data/<lang>/data.json found")
    damaged = legacy = 0
    for c in ckpts:
        try:
            ok = verify_checkpoint(c)
        except CheckpointError as exc:
            damaged += 1
            print(f"DAMAGED  {exc}")
            continue
        legacy += not ok
        print(f"{'ok' if ok else 'legacy':8s} {c}" + ("" if ok else " (no manifest: not verifiable)"))
    for prefix in datasets:
        try:
            checked = check_dataset(prefix, full=True)
        except IntegrityError as exc:
            damaged += 1
            print(f"DAMAGED  {exc}")
            continue
        print(f"{'ok' if checked else 'skipped':8s} {prefix}.bin/.idx")
    print(f"verify: {len(ckpts)} checkpoints, {len(datasets)} datasets: {damaged} damaged, {legacy} without manifest",
          file=sys.stderr)
    return 1 if damaged else 0
