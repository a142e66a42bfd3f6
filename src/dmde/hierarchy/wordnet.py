"""WordNet 3.0 noun database reader (§III).

Classes are WordNet 3.0 noun synsets named by ImageNet WNIDs: ``n01440764`` is the synset at byte
offset 01440764 of ``data.noun`` (docs/METHOD.md, "Classes"). This module parses ``data.noun`` directly (no NLTK at
run time) and keeps what Eq. 1 needs: the hypernym graph over noun synsets, walking both hypernym
(``@``) and instance-hypernym (``@i``) pointers as NLTK's ``shortest_path_distance`` does.

Database search order (:meth:`WordNet.load`): explicit path, ``$DMDE_WORDNET``,
``/usr/share/wordnet`` (Debian's ``wordnet-base``), then NLTK data directories
(``nltk.data.path`` and ``~/nltk_data``, each with ``corpora/wordnet/``).
"""
from __future__ import annotations

import os
import re
import shutil
import warnings
from collections import deque
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from dmde.core.errors import DmdeValueError, WordNetNotFoundError

ENV_VAR = "DMDE_WORDNET"
DEBIAN_DIR = "/usr/share/wordnet"
INSTALL_HINT = (
    "install it (apt-get install wordnet-base wordnet-sense-index) "
    f"or point ${ENV_VAR} / --wordnet at a directory holding data.noun"
)

_WNID_RE = re.compile(r"n(\d{8})")
_NLTK_NAME_RE = re.compile(r"(.+)\.n\.(\d+)")
_HYPERNYM_SYMBOLS = frozenset({"@", "@i"})

# lexnames(5WN): NLTK's WordNetCorpusReader refuses a directory without this file, and Debian's
# wordnet-base does not ship it. Only used by :func:`nltk_reader` to cross-check Eq. 1 with NLTK.
_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
    "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group "
    "noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant "
    "noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
_LEX_POS = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}

_CACHE: dict[str, "WordNet"] = {}  # data.noun path + mtime + size → parsed graph


def _dict_dir_in(path: Path) -> Path | None:
    """The directory holding ``data.noun`` inside ``path`` (a dict dir or an NLTK data root)."""
    if path.is_file() and path.name == "data.noun":
        return path.parent
    for cand in (path, path / "corpora" / "wordnet", path / "wordnet", path / "dict"):
        if (cand / "data.noun").is_file():
            return cand
    return None


def find_wordnet(path: str | os.PathLike | None = None) -> Path:
    """Locate WordNet 3.0's dict directory (holding ``data.noun``); see the module docstring.

    An explicit ``path`` or ``$DMDE_WORDNET`` that holds no ``data.noun`` is an error rather than
    a silent fall-through, so a typo never picks up a different database.
    """
    for given, what in ((path, "--wordnet"), (os.environ.get(ENV_VAR) or None, f"${ENV_VAR}")):
        if given is not None:
            found = _dict_dir_in(Path(given).expanduser())
            if found is None:
                raise WordNetNotFoundError(
                    f"no WordNet data.noun under {given} (from {what}); {INSTALL_HINT}"
                )
            return found
    found = _dict_dir_in(Path(DEBIAN_DIR))
    if found is not None:
        return found
    cands: list[Path] = []
    try:
        import nltk.data  # only for its list of data directories (slow import: asked last)

        cands += [Path(p) for p in nltk.data.path]
    except Exception:  # nltk absent or broken: it is optional
        pass
    cands.append(Path("~/nltk_data").expanduser())
    for cand in cands:
        found = _dict_dir_in(cand)
        if found is not None:
            return found
    raise WordNetNotFoundError(f"WordNet 3.0 database not found; {INSTALL_HINT}")


class WordNet:
    """The WordNet 3.0 noun hypernym graph.

    Synsets are numbered 0..n−1 in file (= offset) order. Attributes:
    ``n`` number of noun synsets; ``offsets`` (n,) int64 byte offsets; ``parents`` list of tuples of
    hypernym + instance-hypernym indices; ``depth`` (n,) int32 longest hypernym path from a root;
    ``max_depth`` H of Eq. 1 (19 on WordNet 3.0); ``root`` directory it was read from.
    """

    def __init__(
        self,
        offsets: np.ndarray,
        lemmas: Sequence[tuple[str, ...]],
        parents: Sequence[tuple[int, ...]],
        root: Path | None = None,
    ) -> None:
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.n = int(self.offsets.size)
        self._lemmas = list(lemmas)
        self.parents = list(parents)
        self.root = root
        self._pos = {int(o): i for i, o in enumerate(self.offsets)}
        self._children: list[list[int]] | None = None
        self._senses: dict[str, list[int]] | None = None
        # Parent edges as flat arrays, reused by the vectorised sweeps in dmde.hierarchy.semantic.
        counts = np.fromiter((len(p) for p in self.parents), dtype=np.int64, count=self.n)
        self.parent_indptr = np.concatenate([[0], np.cumsum(counts)])
        self.parent_indices = np.fromiter(
            (q for p in self.parents for q in p), dtype=np.int64, count=int(counts.sum())
        )
        self.depth = self._longest_depths()
        self.max_depth = int(self.depth.max()) if self.n else 0

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "WordNet":
        """Read (once per resolved directory, then cached) WordNet 3.0's noun database."""
        f = find_wordnet(path).resolve() / "data.noun"
        st = f.stat()
        key = f"{f}:{st.st_mtime_ns}:{st.st_size}"  # a rewritten file is read again
        if key not in _CACHE:
            _CACHE[key] = cls.from_data_noun(f)
        return _CACHE[key]

    @classmethod
    def from_data_noun(cls, data_noun: str | os.PathLike) -> "WordNet":
        """Parse a ``data.noun`` file (wndb(5WN) format)."""
        p = Path(data_noun)
        offsets: list[int] = []
        lemmas: list[tuple[str, ...]] = []
        raw_parents: list[list[int]] = []
        with open(p, encoding="utf-8", errors="replace") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line or line[0] == " ":  # the licence header lines start with spaces
                    continue
                bar = line.find(" | ")
                tok = (line[:bar] if bar >= 0 else line).split()
                try:
                    w_cnt = int(tok[3], 16)
                    p_at = 4 + 2 * w_cnt
                    p_cnt = int(tok[p_at])
                    offsets.append(int(tok[0]))
                    lemmas.append(tuple(tok[4:p_at:2]))
                    ptrs = tok[p_at + 1 : p_at + 1 + 4 * p_cnt]
                    raw_parents.append(
                        [
                            int(ptrs[k + 1])
                            for k in range(0, len(ptrs), 4)
                            if ptrs[k] in _HYPERNYM_SYMBOLS and ptrs[k + 2] == "n"
                        ]
                    )
                    if len(ptrs) != 4 * p_cnt:
                        raise IndexError
                except (IndexError, ValueError):
                    raise DmdeValueError(
                        f"malformed synset line (line {lineno} of {p})"
                    ) from None
        if not offsets:
            raise DmdeValueError(f"no synsets in {p}")
        pos = {o: i for i, o in enumerate(offsets)}
        try:
            parents = [tuple(pos[o] for o in ps) for ps in raw_parents]
        except KeyError as exc:
            raise DmdeValueError(
                f"hypernym pointer to missing offset {int(exc.args[0]):08d} in {p}"
            ) from None
        return cls(np.array(offsets, dtype=np.int64), lemmas, parents, root=p.parent)

    def _longest_depths(self) -> np.ndarray:
        """Longest hypernym path from a root to each synset: DP over the DAG by edge relaxation."""
        child = np.repeat(np.arange(self.n), np.diff(self.parent_indptr))
        parent = self.parent_indices
        depth = np.zeros(self.n, dtype=np.int64)
        # Each round fixes one more level; a DAG of depth H settles in H + 1 rounds.
        for _ in range(self.n + 1):
            new = depth.copy()
            np.maximum.at(new, child, depth[parent] + 1)
            if np.array_equal(new, depth):
                return depth.astype(np.int32)
            depth = new
        raise DmdeValueError("the hypernym graph has a cycle")

    # ------------------------------------------------------------------ ids and names
    def index(self, wnid: str) -> int:
        """Internal index of a WNID such as ``'n01440764'``."""
        m = _WNID_RE.fullmatch(wnid) if isinstance(wnid, str) else None
        if m is None:
            raise DmdeValueError(f"malformed WNID {wnid!r} (expected 'n' and 8 digits)")
        i = self._pos.get(int(m.group(1)))
        if i is None:
            raise DmdeValueError(f"unknown WNID {wnid!r} (not a WordNet 3.0 noun synset)")
        return i

    def indices(self, wnids: Iterable[str]) -> np.ndarray:
        """Indices of a list of WNIDs; a WNID listed twice is an error naming both positions."""
        out: list[int] = []
        seen: dict[int, int] = {}
        for k, w in enumerate(wnids):
            i = self.index(w)
            if i in seen:
                raise DmdeValueError(
                    f"duplicate WNID {w!r} (positions {seen[i]} and {k} of the list)"
                )
            seen[i] = k
            out.append(i)
        return np.array(out, dtype=np.int64)

    def wnid(self, i: int) -> str:
        return f"n{int(self.offsets[i]):08d}"

    def lemmas(self, i: int) -> tuple[str, ...]:
        return self._lemmas[i]

    def name(self, i: int) -> str:
        """Human-readable name: the first lemma with underscores as spaces."""
        return self._lemmas[i][0].replace("_", " ")

    def _sense_lists(self) -> dict[str, list[int]]:
        """lemma (lower case) → synset indices in sense order (index.noun; file order if absent)."""
        if self._senses is None:
            senses: dict[str, list[int]] = {}
            index_noun = self.root / "index.noun" if self.root is not None else None
            if index_noun is not None and index_noun.is_file():
                with open(index_noun, encoding="utf-8", errors="replace") as fh:
                    for line in fh:
                        if line[:1] == " ":
                            continue
                        tok = line.split()
                        try:
                            n_syn = int(tok[2])
                            offs = tok[len(tok) - n_syn :]
                            senses[tok[0].lower()] = [self._pos[int(o)] for o in offs]
                        except (IndexError, ValueError, KeyError):
                            continue  # a line we cannot use only costs lemma lookup for it
            else:
                for i, lem in enumerate(self._lemmas):
                    for w in lem:
                        senses.setdefault(w.lower(), []).append(i)
            self._senses = senses
        return self._senses

    def senses(self, lemma: str) -> list[int]:
        """Every noun synset of ``lemma`` (``crane``: the bird, the machine, …), in WordNet's order."""
        return list(self._sense_lists().get(lemma.strip().lower().replace(" ", "_"), []))

    def resolve_unambiguous(self, text: str) -> int:
        """:meth:`resolve`, but a bare lemma with several noun senses is an error that lists them
        (a dataset's class folder must not silently become the first sense)."""
        t = text.strip()
        if not _WNID_RE.fullmatch(t) and not _NLTK_NAME_RE.fullmatch(t):
            found = self.senses(t)
            if len(found) > 1:
                listed = "; ".join(f"{t}.n.{k:02d} = {self.wnid(i)} ({', '.join(self.lemmas(i)[:3])})"
                                   for k, i in enumerate(found[:6], 1))
                raise DmdeValueError(f"class {t!r} has {len(found)} noun senses in WordNet: {listed}"
                                     f"{'; …' if len(found) > 6 else ''}: name it by its WNID or as {t}.n.NN")
        return self.resolve(t)

    def resolve(self, text: str) -> int:
        """Index of a WNID (``n02084071``), a lemma (``dog``: its first sense) or ``dog.n.01``."""
        t = text.strip()
        if _WNID_RE.fullmatch(t):
            return self.index(t)
        m = _NLTK_NAME_RE.fullmatch(t)
        lemma, sense = (m.group(1), int(m.group(2))) if m else (t, 1)
        lst = self._sense_lists().get(lemma.lower().replace(" ", "_"), [])
        if not 1 <= sense <= len(lst):
            raise DmdeValueError(f"no WordNet noun synset for {text!r}")
        return lst[sense - 1]

    # ------------------------------------------------------------------ graph
    def children(self, i: int) -> list[int]:
        """Direct hyponyms (including instances) of synset ``i``."""
        if self._children is None:
            ch: list[list[int]] = [[] for _ in range(self.n)]
            for c, ps in enumerate(self.parents):
                for p in ps:
                    ch[p].append(c)
            self._children = ch
        return self._children[i]

    def ancestors(self, i: int) -> dict[int, int]:
        """Each hypernym ancestor of ``i`` (itself included, at 0) → fewest edges up to it."""
        dist = {i: 0}
        queue = deque([i])
        while queue:
            s = queue.popleft()
            for p in self.parents[s]:
                if p not in dist:  # BFS: the first visit is the shortest
                    dist[p] = dist[s] + 1
                    queue.append(p)
        return dist

    def lowest_common_hypernyms(self, indices: Iterable[int]) -> int:
        """The deepest (longest path from the root) synset that is an ancestor of all ``indices``.

        Ties go to the smallest offset, so the answer is deterministic; used to name categories.
        """
        common: set[int] | None = None
        for i in indices:
            anc = self.ancestors(int(i)).keys()
            common = set(anc) if common is None else common.intersection(anc)
        if common is None:
            raise DmdeValueError("lowest_common_hypernyms needs at least one synset")
        if not common:
            raise DmdeValueError("the synsets share no common hypernym")
        return min(common, key=lambda a: (-int(self.depth[a]), int(self.offsets[a])))


def nltk_reader(dict_dir: str | os.PathLike, workdir: str | os.PathLike):
    """An NLTK ``WordNetCorpusReader`` over ``dict_dir``, for cross-checking Eq. 1 against NLTK.

    NLTK needs a ``lexnames`` file that Debian's database lacks, opens only files under its data
    path (refusing symlinks and hard links), and looks up ``corpora/wordnet`` on that path while
    loading: so ``workdir`` becomes an NLTK data root, ``workdir/corpora/wordnet`` holding copies of
    the database files (about 36 MB) plus ``lexnames``, and is added to ``nltk.data.path``.
    Requires nltk (a test/benchmark dependency only).
    """
    import nltk.data
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    src = Path(dict_dir)
    root = Path(workdir).resolve()
    dst = root / "corpora" / "wordnet"
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not (dst / f.name).exists():
            shutil.copyfile(f, dst / f.name)
    if not (dst / "lexnames").exists():
        lines = [f"{k:02d}\t{n}\t{_LEX_POS[n.split('.')[0]]}\n" for k, n in enumerate(_LEXNAMES)]
        (dst / "lexnames").write_text("".join(lines))
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    class _EnglishOnly(WordNetCorpusReader):
        def map_wn(self, version: str = "wordnet") -> None:
            return None  # the version map only serves multilingual data; building it costs ~8 s

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available"
        return _EnglishOnly(str(dst), None)
