"""Known-image banks, pure parts: PDQ hashing of real transformations, the index, the policy's bank rules."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pdqhash
import pytest
import torch
from PIL import Image

from moderator.banks.index import BankIndex, Entry, Hit, hamming_pairs
from moderator.banks.pdq import MATCH_DISTANCE, InvalidHash, PdqHash, from_hex, hash_image, to_hex
from moderator.events import Trigger, review_priority
from moderator.policy import PolicyError, PolicySpec, parse_spec
from moderator.policy.scoring import apply_banks, assemble
from moderator.samples import jpeg_bytes, photo_like

ORIGINALS = 12


def decoded(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def transforms(arr: np.ndarray) -> dict[str, Image.Image]:
    """The copies a re-upload makes: each as the worker decodes it (an encoded file, decoded)."""
    img = Image.fromarray(arr)
    w, h = img.size
    cw, ch = round(w * 0.025), round(h * 0.025)  # a 5% crop: 2.5% off each side
    return {
        "jpeg_q40": decoded(jpeg_bytes(arr, quality=40)),
        "resize_50": decoded(jpeg_bytes(np.asarray(img.resize((w // 2, h // 2), Image.BILINEAR)))),
        "hflip": decoded(jpeg_bytes(arr[:, ::-1])),
        "rot90": decoded(jpeg_bytes(np.ascontiguousarray(np.rot90(arr)))),
        "crop_5": decoded(jpeg_bytes(np.asarray(img.crop((cw, ch, w - cw, h - ch))))),
    }


@pytest.fixture(scope="module")
def originals() -> list[np.ndarray]:
    return [photo_like(640, 480, seed=1000 + i) for i in range(ORIGINALS)]


def partner_entries(originals: list[np.ndarray]) -> list[Entry]:
    """Bank entries as a partner computes them: pdqhash on the full image, no reduction (as HMA does)."""
    out = []
    for i, arr in enumerate(originals):
        vector, quality = pdqhash.compute(arr)
        assert quality >= 50
        out.append(Entry("known", f"img-{i}", "", np.packbits(vector.astype(np.uint8)), None, None))
    return out


def test_hex_form_is_threatexchange_s() -> None:
    vector, _ = pdqhash.compute(photo_like(200, 150, seed=1))
    packed = np.packbits(vector.astype(np.uint8))
    text = to_hex(packed)
    assert len(text) == 64
    # most significant bit first: the first hex digit is the first four bits
    assert int(text[0], 16) == int("".join(map(str, vector[:4].tolist())), 2)
    assert (from_hex(text.upper()) == packed).all()
    with pytest.raises(InvalidHash):
        from_hex("12" * 31)
    with pytest.raises(InvalidHash):
        from_hex("zz" * 32)


def reference_hash(arr: np.ndarray) -> tuple[np.ndarray, int]:
    """Meta's C++ (the ``pdqhash`` package) on the image as :func:`hash_image` reduces it: ``uint8 [8, 32]``."""
    from moderator.banks.pdq import _rgb

    vectors, quality = pdqhash.compute_dihedral(_rgb(arr))
    return np.packbits(np.asarray(vectors, dtype=np.uint8), axis=1), int(quality)


def test_hashes_equal_the_reference_implementation_bit_for_bit() -> None:
    """The numpy PDQ gives Meta's C++ hasher's bits (all 8 variants) and quality, on photos of every size
    and shape: both sides at least 64 px after the 512 reduction (the 64x64 cells then read distinct
    pixels), from 64 px to 2000 px, portrait, landscape, square, and the worker's draft-decoded sizes."""
    rng = np.random.default_rng(7)
    sizes = [(640, 480), (320, 240), (1280, 720), (64, 64), (65, 200), (512, 512), (513, 97), (1999, 1001)]
    sizes += [(int(rng.integers(64, 2000)), int(rng.integers(64, 2000))) for _ in range(120)]
    for i, (w, h) in enumerate(sizes):
        arr = photo_like(w, h, seed=9_000 + i)
        ours, (bits, quality) = hash_image(arr), reference_hash(arr)
        assert ours.quality == quality, (w, h)
        assert (ours.variants == bits).all(), (w, h, np.bitwise_count(ours.variants ^ bits).sum(axis=1))
    noise = np.random.default_rng(1).integers(0, 256, size=(300, 200, 3), dtype=np.uint8)  # all frequencies
    assert (hash_image(noise).variants == reference_hash(noise)[0]).all()


def test_slivers_and_tiny_images_are_hashed_by_the_reference_itself() -> None:
    """A side under 64 px repeats pixels into the 64x64 cells: those hashes come from the C++ (bit for bit);
    under 5 px, all zeros with quality 0."""
    for i, (w, h) in enumerate([(444, 8), (16, 460), (436, 16), (63, 300), (40, 30), (5, 5)]):
        arr = photo_like(w, h, seed=77 + i)
        ours, (bits, quality) = hash_image(arr), reference_hash(arr)
        assert ours.quality == quality and (ours.variants == bits).all(), (w, h)
    tiny = hash_image(np.zeros((4, 300, 3), np.uint8))
    assert tiny.quality == 0 and not tiny.variants.any()


def test_transformed_copies_match_by_pdq_with_dihedral_queries_except_crops(originals: list[np.ndarray]) -> None:
    """JPEG q40, 50% resize, mirror and 90° rotation each match their own entry and no other; a 5% crop
    does not match by PDQ (it is what the embedding rule is for)."""
    index = BankIndex(partner_entries(originals), model=None)
    found: dict[str, list[int | None]] = {}
    for i, arr in enumerate(originals):
        for name, copy in transforms(arr).items():
            hits = index.search([hash_image(copy)], None, MATCH_DISTANCE, None)[0]
            assert all(h.entry.id == f"img-{i}" for h in hits), (name, i, hits)
            found.setdefault(name, []).append(hits[0].pdq_distance if hits else None)
    for name in ("jpeg_q40", "resize_50", "hflip", "rot90"):
        assert None not in found[name], (name, found[name])
        assert max(d for d in found[name] if d is not None) <= 20, (name, found[name])
    assert found["crop_5"].count(None) >= ORIGINALS - 2, found["crop_5"]  # PDQ misses crops (measured: 92%)


def test_the_matched_variant_says_how_the_copy_was_turned(originals: list[np.ndarray]) -> None:
    index = BankIndex(partner_entries(originals[:1]), model=None)
    copies = transforms(originals[0])
    variant = {n: index.search([hash_image(copies[n])], None, MATCH_DISTANCE, None)[0][0].variant
               for n in ("jpeg_q40", "hflip", "rot90")}  # fmt: skip
    assert variant["jpeg_q40"] == "original"
    assert variant["hflip"] != "original" and variant["rot90"] != "original"


def test_a_thousand_unrelated_images_match_nothing_at_the_default_distance(originals: list[np.ndarray]) -> None:
    index = BankIndex(partner_entries(originals), model=None)
    with ThreadPoolExecutor(2) as pool:
        hashes = list(pool.map(lambda s: hash_image(photo_like(320, 240, seed=50_000 + s)), range(1000)))
    hits = index.search(hashes, None, MATCH_DISTANCE, None)
    assert sum(map(len, hits)) == 0
    # nor each other: the thousand as a bank, searched with themselves, find only themselves
    own = BankIndex([Entry("u", str(i), "", h.variants[0], None, None) for i, h in enumerate(hashes)], None)
    for i, image_hits in enumerate(own.search(hashes, None, MATCH_DISTANCE, None)):
        assert [h.entry.id for h in image_hits] == [str(i)] and image_hits[0].pdq_distance == 0


def test_low_quality_query_hashes_are_not_matched() -> None:
    flat = hash_image(np.full((200, 200, 3), 128, np.uint8))
    assert flat.quality < 50 and not flat.usable
    index = BankIndex([Entry("b", "flat", "", flat.variants[0], None, None)], None)
    assert index.search([flat], None, MATCH_DISTANCE, None) == [[]]


def test_faiss_range_search_equals_numpy_popcount() -> None:
    rng = np.random.default_rng(3)
    bank = rng.integers(0, 256, size=(3000, 32), dtype=np.uint8)
    queries = rng.integers(0, 256, size=(64, 32), dtype=np.uint8)
    for q in range(0, 64, 3):  # plant near copies at distances 0..40
        flips = rng.choice(256, size=q % 41, replace=False)
        bits = np.unpackbits(bank[q * 7])
        bits[flips] ^= 1
        queries[q] = np.packbits(bits)
    hashes = [PdqHash(np.repeat(row[None], 8, axis=0), 100) for row in queries]
    index = BankIndex([Entry("b", str(i), "", row, None, None) for i, row in enumerate(bank)], None)
    found = index.search(hashes, None, 31, None)
    got = {(i, int(h.entry.id), h.pdq_distance) for i, hs in enumerate(found) for h in hs}
    qi, hi, dist = hamming_pairs(queries, bank, 31)
    assert got == set(zip(qi.tolist(), hi.tolist(), dist.tolist(), strict=True))
    assert len(got) >= 15


def test_embedding_matches_of_this_model_only_and_merged_with_pdq() -> None:
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(3, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    h = rng.integers(0, 256, size=32, dtype=np.uint8)
    entries = [
        Entry("b", "both", "", h, vecs[0].astype(np.float16), "model-a"),
        Entry("b", "other-model", "", None, vecs[1].astype(np.float16), "model-b"),
        Entry("b", "emb", "", None, vecs[2].astype(np.float16), "model-a"),
    ]
    index = BankIndex(entries, "model-a")
    assert index.embedding_entries == 2 and index.pdq_entries == 1
    query = torch.from_numpy(vecs.copy())
    hits = index.search([PdqHash(np.repeat(h[None], 8, 0), 100), None, None], query, 31, 0.99)
    assert [(x.entry.id, x.pdq_distance, x.cosine is not None) for x in hits[0]] == [("both", 0, True)]
    assert hits[1] == []  # the other model's entry is not compared with this model's embeddings
    assert [x.entry.id for x in hits[2]] == ["emb"] and hits[2][0].pdq_distance is None
    assert index.search([None] * 3, query, None, None) == [[], [], []]  # both kinds off


POLICY = """
name: p
categories:
  - {name: weapons, descriptions: [a gun], flag: 0.9, review: 0.5, severity: high}
  - {name: drugs, descriptions: [pills], flag: 0.9, review: 0.5}
banks:
  - {name: known-weapons, decision: flag, category: weapons, severity: critical, pdq_distance: 20, cosine: 0.97}
  - {name: lookalikes, negative: true, categories: [weapons]}
"""


def compiled(text: str = POLICY):  # type: ignore[no-untyped-def]
    spec = parse_spec(text, "p.yaml")
    vectors = np.eye(4, dtype=np.float32)[: len(spec.categories)]
    return assemble(spec, vectors, 100.0, "m")


def hit(bank: str, entry: str, dist: int | None = None, cos: float | None = None) -> Hit:
    return Hit(Entry(bank, entry, "label", None, None, None), dist, "original" if dist is not None else None, cos)


def test_a_positive_bank_match_decides_and_explains_itself() -> None:
    policy = compiled()
    scores = np.array([[0.1, 0.1], [0.1, 0.1], [0.1, 0.1]])
    out = policy.decide(scores, [[hit("known-weapons", "e1", dist=12)], [hit("known-weapons", "e2", dist=25)],
                                 [hit("known-weapons", "e3", dist=25, cos=0.98)]])  # fmt: skip
    assert out[0].decision == "flag"
    t = out[0].triggered[0]
    assert (t.rule, t.category, t.severity) == ("bank", "weapons", "critical")
    assert t.match is not None and (t.match.bank, t.match.entry, t.match.pdq_distance, t.match.pdq_max) == (
        "known-weapons", "e1", 12, 20,
    )  # fmt: skip
    assert out[1].decision == "allow" and out[1].triggered == []  # 25 > the rule's 20, no embedding hit
    m = out[2].triggered[0].match
    assert out[2].decision == "flag" and m is not None and m.cosine == 0.98 and m.pdq_distance is None
    assert review_priority(out[0].triggered) == 100


def test_a_negative_bank_stops_its_category_flagging() -> None:
    policy = compiled()
    scores = np.array([[0.95, 0.1], [0.95, 0.6]])
    negative = hit("lookalikes", "benign-1", dist=3)
    out = policy.decide(scores, [[negative], [negative]])
    assert out[0].decision == "allow"
    assert [(t.rule, t.category, t.action) for t in out[0].triggered] == [("bank", "weapons", "allow")]
    assert out[1].decision == "review"  # drugs still reviews: the negative bank names weapons only
    assert {t.category for t in out[1].triggered if t.rule != "bank"} == {"drugs"}
    assert review_priority(out[0].triggered) == 0
    # a positive match of the same category is suppressed too
    both = policy.decide(np.array([[0.1, 0.1]]), [[negative, hit("known-weapons", "e", dist=0)]])[0]
    assert both.decision == "allow"
    # without the negative hit, the same scores flag
    assert policy.decide(scores)[0].decision == "flag"


def test_hits_of_banks_the_policy_does_not_name_do_nothing() -> None:
    out = compiled().decide(np.array([[0.1, 0.1]]), [[hit("someone-elses", "x", dist=0)]])
    assert out[0].decision == "allow" and out[0].triggered == []


def test_apply_banks_keeps_the_strongest_action() -> None:
    spec = parse_spec(POLICY.replace("decision: flag", "decision: review"), "p.yaml")
    flag = Trigger(category="drugs", rule="flag", score=0.95, threshold=0.9)
    kept, code = apply_banks(spec.banks, [hit("known-weapons", "e", dist=1)], [flag])
    assert code == 2 and {t.rule for t in kept} == {"flag", "bank"}


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("{name: b, pdq_distance: null}", "needs pdq_distance or cosine"),
        ("{name: b, negative: true}", "names the categories"),
        ("{name: b, negative: true, categories: [weapons], decision: flag}", "decides nothing"),
        ("{name: b, categories: [weapons]}", "for negative banks"),
        ("{name: b, negative: true, categories: [nope]}", "no categories ['nope']"),
        ("{name: b, cosine: 1.5}", "less than or equal to 1"),
        ("{name: b, pdq_distance: 300}", "less than or equal to 128"),
    ],
)
def test_bank_rules_are_validated(rule: str, message: str) -> None:
    category = "{name: weapons, descriptions: [a gun], flag: 0.9, review: 0.5}"
    text = f"name: p\ncategories: [{category}]\nbanks: [{rule}]"
    with pytest.raises(PolicyError) as exc:
        parse_spec(text, "p.yaml")
    assert message in str(exc.value)
    assert "banks[0]" in str(exc.value) or "p.yaml" in str(exc.value)


def test_banks_change_the_version_only_when_a_policy_has_rules() -> None:
    base = "name: p\ncategories: [{name: weapons, descriptions: [a gun], flag: 0.9, review: 0.5}]\n"
    plain = parse_spec(base, "p.yaml")
    assert parse_spec(base + "banks: []\n", "p.yaml").version() == plain.version()
    with_bank = parse_spec(base + "banks: [{name: b}]\n", "p.yaml")
    assert with_bank.version() != plain.version()
    assert with_bank.version() != parse_spec(base + "banks: [{name: b, pdq_distance: 20}]\n", "p.yaml").version()
    assert isinstance(plain, PolicySpec) and plain.max_pdq_distance is None and with_bank.max_pdq_distance == 31


# --- hash lists and entries as they arrive ---------------------------------------------------------
H1, H2, H3 = "a" * 64, "b" * 63 + "c", "0123456789abcdef" * 4


def test_hash_lists_in_threatexchange_s_forms_are_read() -> None:
    from moderator.banks.entries import export_hash_list, parse_hash_list

    def parse(text: str):  # type: ignore[no-untyped-def]
        return parse_hash_list(text, "known", source="csv:test", added_by="t")

    # pdq-photo-hasher: hash,quality,path (a path with spaces becomes the label, the hash the id)
    plain = parse(f"{H1},100,/photos/a b.jpg\n{H2},30,low.jpg\n{H3},90,c.jpg\n")
    assert [(e.id, e.label) for e in plain.entries] == [(H1, "/photos/a b.jpg"), ("c.jpg", "")]
    assert plain.low_quality == 1 and not plain.invalid
    # its --details form
    details = parse(f"hash={H1},norm=128,delta=0,quality=100,filename=x.jpg\n")
    assert [(e.id, e.pdq_quality) for e in details.entries] == [("x.jpg", 100)]
    # threatexchange dataset --csv: other signal types and FALSE_POSITIVE opinions are not imported
    te = parse(
        "signal_type,signal_str,collab,category,tags,id\n"
        f"pdq,{H1},partner,TRUE_POSITIVE,gun,1\n"
        f"md5,{'f' * 32},partner,TRUE_POSITIVE,,2\n"
        f"pdq,{H2},partner,FALSE_POSITIVE,,3\n"
    )
    assert [(e.id, e.label) for e in te.entries] == [("1", "partner TRUE_POSITIVE gun")]
    assert (te.skipped_other_signal, te.false_positive_opinions) == (1, 1)
    # not a hash: reported with its line number
    assert parse("pdq nothex\n").invalid[0][0] == 1
    # the export reads back to the same entries
    again = parse(export_hash_list(plain.entries))

    def fields(entries):  # type: ignore[no-untyped-def]
        return [(e.id, e.pdq, e.pdq_quality) for e in entries]

    assert fields(again.entries) == fields(plain.entries)


def test_a_bank_record_that_cannot_match_is_refused_not_indexed() -> None:
    import base64

    from moderator.banks.store import decode
    from moderator.events import BankEntry

    def entry(vector: np.ndarray | None, pdq: str | None = None, model: str = "m") -> BankEntry:
        embedding = None if vector is None else base64.b64encode(vector.astype("<f2").tobytes()).decode()
        dim = None if vector is None else vector.size
        return BankEntry(bank="b", id="e", pdq=pdq, pdq_quality=None, embedding=embedding, dim=dim, model=model,
                         source="test", added_by="t", added_at="2026-12-01T00:00:00Z")  # fmt: skip

    unit = np.zeros(8, dtype=np.float32)
    unit[0] = 1.0
    assert decode(entry(unit), "m", 8).embedding is not None
    with pytest.raises(ValueError, match="expected"):
        decode(entry(unit), "m", 16)  # another dimension than the worker's model
    with pytest.raises(ValueError, match="normalized"):
        decode(entry(unit * 5), "m", 8)
    with pytest.raises(ValueError, match="normalized"):
        decode(entry(np.full(8, np.nan, dtype=np.float32)), "m", 8)
    # another model's embedding is dropped: with a PDQ hash the entry still matches by it, without one it is refused
    assert decode(entry(unit, pdq=H1, model="other"), "m", 8).embedding is None
    with pytest.raises(ValueError, match="neither"):
        decode(entry(unit, model="other"), "m", 8)
