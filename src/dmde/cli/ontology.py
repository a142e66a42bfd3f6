"""``dmde ontology build|show``: the two-layer ontology of §III (and the visual tree of §V(e))."""
from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ontology", help="build or show the two-layer ontology (root → categories → classes)",
                       description="Build the semantic ontology of §III (Ψ of Eq. 1 over WordNet 3.0, "
                       "spectral clustering into K categories, left-to-right order) or the visual tree of "
                       "§V(e) from class-mean features; or print/plot one.")
    osub = p.add_subparsers(dest="ontology_command", metavar="ACTION")
    osub.required = True

    b = osub.add_parser("build", help="build an ontology and write it as JSON",
                        description="Build a two-layer ontology. Classes come from --wnids (semantic tree), "
                        "--features (visual tree) or, with neither, the bundled Fashion-MNIST class list. "
                        "Non-atomic classes (a listed class with a listed hyponym, §III) are reported; "
                        "--drop-non-atomic removes them.")
    src = b.add_mutually_exclusive_group()
    src.add_argument("--wnids", metavar="FILE", help="class list: one WNID per line (first token; '#' comments)")
    src.add_argument("--features", metavar="FILE.npz",
                     help="visual tree: .npz with 'features' (N, d) class-mean features and 'wnids' (N,); "
                     "optional 'names' (N,)")
    b.add_argument("--out", required=True, metavar="FILE", help="where to write the ontology JSON")
    b.add_argument("--categories", type=int, default=None, metavar="K",
                   help="number of categories K (default: max(round(N/20), round(sqrt(N))), "
                   "categories of about 20 classes for large N)")
    b.add_argument("--seed", type=int, default=0, metavar="S", help="random seed of the clustering (default 0)")
    b.add_argument("--components", type=int, default=None, metavar="P",
                   help="spectral embedding dimension (default: min(K, 128))")
    b.add_argument("--drop-non-atomic", action="store_true",
                   help="remove non-atomic classes instead of keeping them as classes")
    b.add_argument("--kernel", choices=("cosine", "rbf"), default="cosine",
                   help="visual affinity between class-mean features (--features only; default cosine)")
    b.add_argument("--wordnet", metavar="DIR", default=None,
                   help="WordNet 3.0 dict directory holding data.noun (default: $DMDE_WORDNET, "
                   "/usr/share/wordnet, NLTK's data)")
    b.set_defaults(func=run_build)

    s = osub.add_parser("show", help="print an ontology as a tree, optionally plot it",
                        description="Print root → categories (name, size) → classes (WNID, lemma); "
                        "--plot writes a figure like the paper's Figs. 1–2 (categories only above "
                        "300 classes).")
    s.add_argument("ontology", metavar="ONTOLOGY.json")
    s.add_argument("--plot", metavar="OUT.png", default=None, help="write the tree figure (PNG)")
    s.add_argument("--max-classes", type=int, default=10, metavar="C",
                   help="classes listed per category (default 10; 0 = categories only; -1 = all)")
    s.set_defaults(func=run_show)


def _bundled_wnids() -> list[str]:
    import importlib.resources

    from dmde.hierarchy.semantic import read_wnid_list

    res = importlib.resources.files("dmde").joinpath("resources/fashion_mnist_wnids.txt")
    with importlib.resources.as_file(res) as path:
        return read_wnid_list(path)


def _load_features(path: str):
    from pathlib import Path

    import numpy as np

    from dmde.core.errors import DmdeFileError, DmdeValueError

    p = Path(path)
    if not p.is_file():
        raise DmdeFileError(f"features file {p} does not exist")
    try:
        with np.load(p, allow_pickle=False) as z:
            if "features" not in z or "wnids" not in z:
                raise DmdeValueError(f"features file {p} must hold arrays 'features' and 'wnids' (has {', '.join(z.files)})")
            feats = np.asarray(z["features"])
            wnids = [str(w) for w in z["wnids"]]
            names = [str(s) for s in z["names"]] if "names" in z else None
    except (OSError, ValueError) as exc:
        if isinstance(exc, DmdeValueError):
            raise
        raise DmdeValueError(f"features file {p} is not a readable .npz ({exc})") from None
    return feats, wnids, names


def run_build(args: argparse.Namespace) -> int:
    import time

    from dmde.core.errors import WordNetNotFoundError
    from dmde.core.io import check_output_file
    from dmde.hierarchy.ontology import (
        ONTOLOGY_FORMAT,
        build_semantic_ontology,
        build_visual_ontology,
    )
    from dmde.hierarchy.wordnet import WordNet

    check_output_file(args.out, ONTOLOGY_FORMAT, "ontology")
    t0 = time.perf_counter()
    if args.features is not None:
        feats, wnids, names = _load_features(args.features)
        try:
            wn = WordNet.load(args.wordnet)
        except WordNetNotFoundError:
            if args.wordnet is not None:
                raise
            wn = None  # WordNet only names the categories of a visual tree; do without it
            print("note: WordNet not found; categories are named after their most central class", file=sys.stderr)
        if wn is not None:
            wn.indices(wnids)  # unknown WNIDs are an error naming the culprit
            if names is None:
                names = [wn.name(i) for i in wn.indices(wnids)]
        onto = build_visual_ontology(feats, wnids, names, n_categories=args.categories, random_state=args.seed,
                                     kernel=args.kernel, n_components=args.components, wn=wn,
                                     source=str(args.features))
    else:
        from dmde.hierarchy.semantic import read_wnid_list

        wn = WordNet.load(args.wordnet)
        if args.wnids is not None:
            wnids, source = read_wnid_list(args.wnids, wn), str(args.wnids)
        else:
            wnids, source = _bundled_wnids(), "bundled fashion_mnist_wnids.txt"
        onto = build_semantic_ontology(wn, wnids, n_categories=args.categories, random_state=args.seed,
                                       drop_non_atomic=args.drop_non_atomic, n_components=args.components,
                                       source=source)
    onto.to_json(args.out)
    wall = time.perf_counter() - t0
    sizes = onto.category_sizes()
    print(f"{onto.kind} ontology: {onto.n_classes} classes in {onto.n_categories} categories "
          f"(sizes {sizes.min()}–{sizes.max()}, median {int(sorted(sizes)[len(sizes) // 2])}), "
          f"hash {onto.hash()}, {wall:.1f} s")
    if onto.non_atomic:
        verb = "dropped" if onto.dropped else "kept as classes (--drop-non-atomic removes them)"
        head = ", ".join(onto.non_atomic[:10]) + (" ..." if len(onto.non_atomic) > 10 else "")
        print(f"non-atomic classes: {len(onto.non_atomic)}, {verb}: {head}")
    else:
        print("non-atomic classes: none")
    print(f"wrote {args.out}")
    return 0


def format_tree(onto, max_classes: int = 10) -> str:
    """Root → categories → classes as indented text."""
    sizes = onto.category_sizes()
    lines = [f"root ({onto.kind}, {onto.n_classes} classes, {onto.n_categories} categories, hash {onto.hash()})"]
    for c, cat in enumerate(onto.categories):
        wn = f" {cat.wnid}" if cat.wnid else ""
        lines.append(f"├─ [{c}] {cat.name}{wn} ({sizes[c]} classes)")
        if max_classes == 0:
            continue
        members = onto.members(c)
        shown = members if max_classes < 0 else members[:max_classes]
        for p in shown:
            lines.append(f"│   {p:>6}  {onto.classes[p]}  {onto.lemmas[p]}")
        if len(shown) < len(members):
            lines.append(f"│   ... {len(members) - len(shown)} more")
    if onto.non_atomic:
        lines.append(f"non-atomic: {len(onto.non_atomic)} ({'dropped' if onto.dropped else 'kept'})")
    return "\n".join(lines)


def run_show(args: argparse.Namespace) -> int:
    from dmde.hierarchy.ontology import Ontology

    onto = Ontology.from_json(args.ontology)
    print(format_tree(onto, args.max_classes))
    if args.plot:
        from dmde.run.plots import plot_ontology

        plot_ontology(onto, args.plot)
        print(f"wrote {args.plot}")
    return 0
