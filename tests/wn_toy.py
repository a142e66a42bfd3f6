"""Test helper (not a test file): write a tiny fake WordNet 3.0 noun database.

    from wn_toy import make_toy_wordnet
    wnids = make_toy_wordnet(tmp_path, {"entity": [], "animal": ["entity"], "dog": ["animal"],
                                        "fido": ["@i:dog"]})
    wn = WordNet.load(tmp_path)          # wnids["dog"] is the WNID of 'dog'

Each key is a synset's single lemma; its value lists the parent lemmas (hypernyms, or instance
hypernyms when written ``"@i:name"``). Synsets are written in the dict's order, each at the byte
offset its WNID names, in wndb(5WN) format, with an ``index.noun`` beside it so lemma lookup works.
"""
from __future__ import annotations

import os
from pathlib import Path

_HEADER = "  1 toy WordNet noun database for tests\n  2 (not Princeton's data)\n"


def _line(offset: int, lemma: str, ptrs: list[tuple[str, int]]) -> str:
    p = " ".join(f"{sym} {off:08d} n 0000" for sym, off in ptrs)
    return (
        f"{offset:08d} 03 n 01 {lemma} 0 {len(ptrs):03d}{' ' + p if p else ''} | toy {lemma}  \n"
    )


def make_toy_wordnet(directory: str | os.PathLike, spec: dict[str, list[str]]) -> dict[str, str]:
    """Write ``data.noun`` and ``index.noun`` into ``directory``; return lemma → WNID."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    names = list(spec)
    parsed: dict[str, list[tuple[str, str]]] = {}
    for name, parents in spec.items():
        if " " in name:
            raise ValueError(f"toy lemma {name!r} must not contain spaces")
        parsed[name] = []
        for par in parents:
            sym, target = ("@i", par[3:]) if par.startswith("@i:") else ("@", par)
            if target not in spec:
                raise ValueError(f"toy parent {target!r} of {name!r} is not in the spec")
            parsed[name].append((sym, target))
    # Offsets are 8 digits wide, so every line's length is known before the offsets are.
    offsets: dict[str, int] = {}
    pos = len(_HEADER.encode())
    for name in names:
        offsets[name] = pos
        pos += len(_line(0, name, [(s, 0) for s, _ in parsed[name]]).encode())
    body = "".join(
        _line(offsets[n], n, [(s, offsets[t]) for s, t in parsed[n]]) for n in names
    )
    (d / "data.noun").write_text(_HEADER + body)
    index = "".join(
        f"{n.lower()} n 1 1 @ 1 0 {offsets[n]:08d}  \n" for n in sorted(names, key=str.lower)
    )
    (d / "index.noun").write_text(_HEADER + index)
    return {n: f"n{offsets[n]:08d}" for n in names}


# A small hierarchy with multiple inheritance (dog, goldfish also under 'companion', a shortcut to
# the root) and an instance hypernym (fido). Longest depth H = 9 (fido via canine); fido's shortest
# way up is only 4 edges (via companion).
ANIMALS: dict[str, list[str]] = {
    "entity": [],
    "object": ["entity"],
    "abstraction": ["entity"],
    "whole": ["object"],
    "living_thing": ["whole"],
    "organism": ["living_thing"],
    "animal": ["organism"],
    "carnivore": ["animal"],
    "canine": ["carnivore"],
    "feline": ["carnivore"],
    "companion": ["abstraction"],
    "dog": ["canine", "companion"],
    "cat": ["feline"],
    "goldfish": ["animal", "companion"],
    "fido": ["@i:dog"],
    "idea": ["abstraction"],
}
