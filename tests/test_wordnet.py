"""dmde.hierarchy.wordnet: the data.noun reader, WNID / lemma resolution, ancestors, H (docs/METHOD.md, "Classes")."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from wn_toy import ANIMALS, make_toy_wordnet

from dmde.core.errors import DmdeError, DmdeValueError, WordNetNotFoundError
from dmde.hierarchy.wordnet import WordNet, find_wordnet


@pytest.fixture()
def toy(tmp_path):
    ids = make_toy_wordnet(tmp_path / "dict", ANIMALS)
    wn = WordNet.load(tmp_path / "dict")
    return wn, {name: wn.index(w) for name, w in ids.items()}, ids


@pytest.fixture(scope="module")
def real(real_wordnet_dir) -> WordNet:
    return WordNet.load(real_wordnet_dir)


# ---------------------------------------------------------------------- toy database
def test_toy_offsets_are_byte_offsets(tmp_path):
    ids = make_toy_wordnet(tmp_path, ANIMALS)
    blob = (tmp_path / "data.noun").read_bytes()
    for name, w in ids.items():
        off = int(w[1:])
        assert blob[off : off + 8].decode() == w[1:]
        assert f" {name} 0 ".encode() in blob[off : blob.index(b"\n", off)]


def test_parse_toy(toy):
    wn, ix, ids = toy
    assert wn.n == len(ANIMALS)
    assert [wn.wnid(ix[k]) for k in ANIMALS] == [ids[k] for k in ANIMALS]
    assert wn.parents[ix["dog"]] == (ix["canine"], ix["companion"])
    assert wn.parents[ix["fido"]] == (ix["dog"],)  # the instance hypernym counts as a parent
    assert wn.parents[ix["entity"]] == ()
    assert sorted(wn.children(ix["companion"])) == sorted([ix["dog"], ix["goldfish"]])
    assert wn.lemmas(ix["living_thing"]) == ("living_thing",)
    assert wn.name(ix["living_thing"]) == "living thing"


def test_max_depth_is_longest_path(toy):
    wn, ix, _ = toy
    # fido: entity→object→whole→living_thing→organism→animal→carnivore→canine→dog→fido;
    # its shortest way up (via companion) is 4 edges: H must be the longest.
    assert wn.max_depth == 9
    assert wn.depth[ix["fido"]] == 9 and wn.depth[ix["companion"]] == 2


def test_ancestors_shortest_edges(toy):
    wn, ix, _ = toy
    anc = wn.ancestors(ix["fido"])
    assert anc[ix["fido"]] == 0 and anc[ix["dog"]] == 1
    assert anc[ix["entity"]] == 4  # through the second parent of dog
    assert anc[ix["animal"]] == 4
    assert ix["feline"] not in anc and ix["cat"] not in anc


def test_lowest_common_hypernyms(toy):
    wn, ix, _ = toy
    assert wn.lowest_common_hypernyms([ix["dog"], ix["cat"]]) == ix["carnivore"]
    # Both animal (depth 5) and companion (depth 2) are common; the deepest wins.
    assert wn.lowest_common_hypernyms([ix["fido"], ix["goldfish"]]) == ix["animal"]
    assert wn.lowest_common_hypernyms([ix["dog"], ix["idea"]]) == ix["abstraction"]
    assert wn.lowest_common_hypernyms([ix["cat"]]) == ix["cat"]
    with pytest.raises(DmdeValueError):
        wn.lowest_common_hypernyms([])


def test_resolve(toy):
    wn, ix, ids = toy
    assert wn.resolve(ids["cat"]) == ix["cat"]
    assert wn.resolve("cat") == ix["cat"]
    assert wn.resolve("Living Thing") == ix["living_thing"]
    assert wn.resolve("dog.n.01") == ix["dog"]
    with pytest.raises(DmdeValueError, match="'dog.n.02'"):
        wn.resolve("dog.n.02")
    with pytest.raises(DmdeValueError, match="'unicorn'"):
        wn.resolve("unicorn")


def test_index_errors_name_the_culprit(toy):
    wn, ix, ids = toy
    with pytest.raises(DmdeValueError, match=r"malformed WNID 'n123'"):
        wn.index("n123")
    with pytest.raises(DmdeValueError, match=r"malformed WNID 'x01440764'"):
        wn.index("x01440764")
    with pytest.raises(DmdeValueError, match=r"unknown WNID 'n99999999'"):
        wn.index("n99999999")
    with pytest.raises(DmdeValueError, match=r"duplicate WNID '%s' \(positions 0 and 2" % ids["cat"]):
        wn.indices([ids["cat"], ids["dog"], ids["cat"]])
    assert list(wn.indices([ids["cat"], ids["dog"]])) == [ix["cat"], ix["dog"]]


def test_malformed_data_line(tmp_path):
    make_toy_wordnet(tmp_path, {"entity": [], "thing": ["entity"]})
    p = tmp_path / "data.noun"
    p.write_text(p.read_text() + "00000999 03 n zz broken\n")
    with pytest.raises(DmdeValueError, match=r"line 5 of .*data\.noun"):
        WordNet.load(tmp_path)
    p.write_text("  1 licence text only\n")
    with pytest.raises(DmdeValueError, match=r"no synsets in .*data\.noun"):
        WordNet.load(tmp_path)


# ---------------------------------------------------------------------- finding the database
def test_load_layouts_and_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("DMDE_WORDNET", raising=False)
    nltk_root = tmp_path / "nltk_data"
    make_toy_wordnet(nltk_root / "corpora" / "wordnet", ANIMALS)
    a = WordNet.load(nltk_root)  # an NLTK data root
    assert WordNet.load(nltk_root / "corpora" / "wordnet") is a  # cached per resolved dir
    assert WordNet.load(nltk_root / "corpora" / "wordnet" / "data.noun") is a
    monkeypatch.setenv("DMDE_WORDNET", str(nltk_root))
    assert WordNet.load() is a
    assert find_wordnet() == (nltk_root / "corpora" / "wordnet")


def test_missing_wordnet_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("DMDE_WORDNET", raising=False)
    missing = tmp_path / "nowhere"
    with pytest.raises(WordNetNotFoundError, match=r"nowhere .*apt-get install wordnet-base"):
        WordNet.load(missing)
    monkeypatch.setenv("DMDE_WORDNET", str(missing))
    with pytest.raises(WordNetNotFoundError, match=r"DMDE_WORDNET"):
        WordNet.load()
    # Nothing anywhere: the default locations all point at empty directories.
    monkeypatch.delenv("DMDE_WORDNET")
    monkeypatch.setattr("dmde.hierarchy.wordnet.DEBIAN_DIR", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    nltk_data = pytest.importorskip("nltk.data")
    monkeypatch.setattr(nltk_data, "path", [str(tmp_path)])
    with pytest.raises(WordNetNotFoundError) as exc:
        WordNet.load()
    msg = str(exc.value)
    assert "\n" not in msg and "wordnet-base" in msg and "DMDE_WORDNET" in msg
    assert isinstance(exc.value, (DmdeError, FileNotFoundError))


# ---------------------------------------------------------------------- real WordNet 3.0
def test_real_wordnet(real):
    assert real.n == 82115
    assert real.max_depth == 19  # H of WordNet 3.0 nouns (NLTK's _compute_max_depth)
    dog, cat = real.resolve("dog"), real.resolve("cat.n.01")
    assert real.wnid(dog) == "n02084071" and real.wnid(cat) == "n02121620"
    assert real.index("n01440764") == real.resolve("tench")
    assert real.lemmas(dog)[:2] == ("dog", "domestic_dog")
    assert real.name(real.lowest_common_hypernyms([dog, cat])) == "carnivore"
    assert real.name(real.resolve("entity")) == "entity" and real.depth[real.resolve("entity")] == 0
    # Instance hypernyms are parents: the Mississippi River is an instance of river.
    miss = real.index("n09356080")
    assert real.name(real.parents[miss][0]) == "river"


def test_real_parse_time(real_wordnet_dir):
    t = time.perf_counter()
    WordNet.from_data_noun(Path(real_wordnet_dir) / "data.noun")
    assert time.perf_counter() - t < 10.0  # ~0.5 s measured; generous for a shared CPU


def test_an_ambiguous_class_name_lists_its_senses(real_wordnet_dir):
    """A dataset's class folder `crane` must not silently become the bird: one error listing the
    senses; `crane.n.02` or the WNID picks one."""
    from dmde.run.prepare import class_wnids

    wn = WordNet.load(str(real_wordnet_dir))
    assert len(wn.senses("crane")) >= 2
    with pytest.raises(DmdeValueError, match=r"class 'crane' has \d+ noun senses in WordNet: crane.n.01 = n\d{8}"):
        class_wnids(["crane"], wn)
    second = wn.wnid(wn.senses("crane")[1])
    assert class_wnids(["crane.n.02", second], wn) == [second, second]
    assert class_wnids(["zebra"], wn) == [wn.wnid(wn.resolve("zebra"))]  # one sense: fine
