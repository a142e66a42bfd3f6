"""``dmde shards``: write a dataset into tar shards, split as a run splits it (streaming data)."""
from __future__ import annotations

import argparse

from dmde.cli.train import OVERRIDES_HELP


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shards", help="write a dataset into tar shards for streaming (webdataset format)",
                       description="Read SRC (a Tiny-ImageNet directory or zip, an ImageFolder, or a Fashion-MNIST "
                       "directory), split it per class into hold-out / fusion / train exactly as `dmde train` "
                       "would with the same data settings, and write the splits into tar shards with a per-class "
                       "index. Train on them with data.dataset=shards data.root=DIR.")
    p.add_argument("src", metavar="SRC", help="the dataset to read")
    p.add_argument("--out", required=True, metavar="DIR", help="shard directory to create (must not exist)")
    p.add_argument("--shard-size", type=int, default=5000, metavar="N", help="images per shard (default 5000)")
    p.add_argument("--dataset", default=None, choices=("tiny_imagenet", "imagefolder", "fashion_mnist"),
                   help="how to read SRC (default: guessed from its layout)")
    p.add_argument("--config", default=None, help="YAML run config whose data section sets the split")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    p.set_defaults(func=run)


def guess_dataset(src: str) -> str:
    from pathlib import Path

    path = Path(src)
    if path.suffix == ".zip" or (path / "wnids.txt").is_file() or (path / "tiny-imagenet-200").is_dir():
        return "tiny_imagenet"
    if any(path.glob("train-images-idx3-ubyte*")):
        return "fashion_mnist"
    return "imagefolder"


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dmde.core.config import load_config
    from dmde.core.errors import DmdeFileError
    from dmde.run.config import RunConfig, validate
    from dmde.run.prepare import run_wordnet, write_run_shards

    if not Path(args.src).exists():
        raise DmdeFileError(f"{args.src} does not exist")
    dataset = args.dataset or guess_dataset(args.src)
    overrides = [f"data.dataset={dataset}", f"data.root={args.src}", *args.overrides]
    cfg = load_config(RunConfig, args.config, overrides)
    validate(cfg)
    wn = run_wordnet(cfg) if cfg.data.dataset == "imagefolder" else None
    index = write_run_shards(cfg.data, args.out, shard_size=args.shard_size, wn=wn, progress=not args.no_progress)
    counts = ", ".join(f"{n} {v['count']}" for n, v in index["splits"].items())
    print(f"wrote {len(index['shard_files'])} shards of {len(index['classes'])} classes into {args.out}: {counts} "
          f"images at {index['image_size'][0]}×{index['image_size'][1]}")
    changed = _changed(cfg)
    print(f"train on them with: dmde train --out RUN data.dataset=shards data.root={args.out} "
          + " ".join(f"data.{k}={v}" for k, v in index["settings"].items()
                     if k not in ("dataset", "on_corrupt") and v is not None and k in changed))
    return 0


def _changed(cfg) -> set[str]:
    """The data settings that differ from their defaults (the ones a training run must repeat)."""
    from dmde.run.config import DataConfig

    d = DataConfig()
    return {k for k in vars(d) if getattr(cfg.data, k) != getattr(d, k)}
