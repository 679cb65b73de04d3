"""`bfd make-synthetic`: write a small random dataset (MURA or flat layout) to try the training pipeline on.

The data is noise with part-dependent shapes: it exercises the plumbing end to end and means nothing for
accuracy, which the command says, and the SYNTHETIC.md it writes says again.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from training.dataset import DEFAULT_PARTS, SYNTHETIC_MARKER

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder to write (absent or empty, or --force)")
    parser.add_argument("--parts", nargs="+", default=list(DEFAULT_PARTS), help="body parts to generate")
    parser.add_argument("--patients-per-part", type=int, default=10, help="patients per body part (>= 2)")
    parser.add_argument("--layout", choices=["mura", "flat"], default="mura", help="MURA-v1.1 with CSVs, or flat")
    parser.add_argument("--image-size", type=int, default=96, help="square image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    parser.add_argument("--force", action="store_true", help="delete a non-empty --out folder first")


def _unsafe_to_delete(folder: Path) -> str | None:
    """Why `--force` must not delete `folder` (a filesystem root, home, or the working directory or above)."""
    resolved = folder.resolve()
    if resolved == Path(resolved.anchor):
        return "it is a filesystem root"
    if resolved == Path.home().resolve():
        return "it is the home folder"
    cwd = Path.cwd().resolve()
    if cwd == resolved or resolved in cwd.parents:
        return "it contains the current working directory"
    return None


def run(args: argparse.Namespace) -> int:
    from training.synthetic import make_synthetic

    out: Path = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not args.force:
            print(f"error: {out} exists and is not empty; pass --force to replace it", file=sys.stderr)
            return 2
        reason = _unsafe_to_delete(out)
        if reason is not None:
            print(f"error: refusing to delete {out} with --force: {reason}", file=sys.stderr)
            return 2
        log.warning("--force: deleting %s%s", out, "" if (out / SYNTHETIC_MARKER).exists() else " (not synthetic data)")
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()
    try:
        root = make_synthetic(
            out,
            parts=args.parts,
            patients_per_part=args.patients_per_part,
            layout=args.layout,
            image_size=args.image_size,
            seed=args.seed,
        )
    except (ValueError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    n_images = sum(1 for _ in root.rglob("*.png"))
    print(f"Wrote {n_images} synthetic images ({args.layout} layout) to {root}")
    print("They are random shapes and noise, NOT radiographs: meaningless for accuracy (see SYNTHETIC.md).")
    print(f"Dataset root (the folder to train on, e.g. --data): {root}")
    return 0
