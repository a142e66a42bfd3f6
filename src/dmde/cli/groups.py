"""``dmde groups``: overlapping task groups over an ontology's leaves (§IV-A, Fig. 3)."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("groups", help="split an ontology's classes into overlapping task groups",
                       description="Walk the ontology's classes left to right (as a circle) and cut them "
                       "into groups of at most M classes, neighbours sharing a fraction λ (§IV-A, Fig. 3): "
                       "stride round(M(1−λ)), ceil(N/stride) groups spread evenly. Prints how many groups "
                       "each class is in.")
    p.add_argument("--ontology", required=True, metavar="FILE", help="ontology JSON (dmde ontology build)")
    p.add_argument("--size", required=True, type=int, metavar="M", help="largest group size M (≥ 1)")
    p.add_argument("--overlap", required=True, type=float, metavar="LAMBDA", help="overlap λ in [0, 1)")
    p.add_argument("--assignment", choices=("semantic", "random", "visual"), default="semantic",
                   help="order walked: the ontology's (semantic, default), a seeded random permutation "
                   "(the paper's baseline) or the visual tree's (needs --visual-ontology)")
    p.add_argument("--visual-ontology", metavar="FILE", default=None,
                   help="visual tree JSON (dmde ontology build --features) for --assignment visual")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the random assignment (default 0)")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the groups JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dmde.core.errors import DmdeValueError
    from dmde.core.io import check_output_file
    from dmde.hierarchy.groups import GROUPS_FORMAT, make_groups
    from dmde.hierarchy.ontology import Ontology

    check_output_file(args.out, GROUPS_FORMAT, "task-groups")
    onto = Ontology.from_json(args.ontology)
    visual = None
    if args.visual_ontology is not None:
        if args.assignment != "visual":
            raise DmdeValueError("--visual-ontology is only used with --assignment visual")
        visual = Ontology.from_json(args.visual_ontology)
    groups = make_groups(onto, args.size, args.overlap, assignment=args.assignment, random_state=args.seed,
                         visual_ontology=visual)
    groups.to_json(args.out)
    cov = groups.coverage()
    hist = ", ".join(f"{k}: {v}" for k, v in cov["histogram"].items())
    print(f"{cov['n_groups']} groups ({groups.assignment}) over {cov['n_classes']} classes, "
          f"M = {groups.size}, λ = {groups.overlap:g}")
    print(f"group sizes: {cov['group_size_min']}–{cov['group_size_max']}")
    print(f"groups per class: min {cov['groups_per_class_min']}, max {cov['groups_per_class_max']}, "
          f"mean {cov['groups_per_class_mean']:.3f}; histogram {{{hist}}}")
    print(f"wrote {args.out}")
    return 0
