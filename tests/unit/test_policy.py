"""Policies without a model: format validation, versions, scoring by hand, decision properties."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moderator.policy import (
    PolicyError,
    PolicySpec,
    UnknownPolicy,
    assemble,
    build_tables,
    decide_batch,
    load_spec,
    policy_files,
    score_logits,
)

ROOT = Path(__file__).resolve().parents[2]

SPEC = {
    "name": "test",
    "templates": ["a photo of {}."],
    "neutral": ["n1"],
    "categories": [
        {"name": "weapons", "descriptions": ["gun", "rifle"], "contrasts": ["toy"], "flag": 0.8, "review": 0.5},
        {"name": "gore", "descriptions": ["blood"], "flag": 0.9, "review": 0.6, "severity": "high",
         "labels": {"queue": "violence"}},
    ],
}  # fmt: skip


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# --- the format ---------------------------------------------------------------------------------


def test_tables_index_descriptions_contrasts_and_neutral():
    spec = PolicySpec.model_validate(SPEC)
    texts, tables = build_tables(spec)
    assert texts == ["gun", "rifle", "toy", "blood", "n1"]
    assert tables.positive.tolist() == [[1, 1, 0, 0, 0], [0, 0, 0, 1, 0]]
    assert tables.candidates.tolist() == [[1, 1, 1, 0, 1], [0, 0, 0, 1, 1]]


def test_disabled_categories_are_not_scored():
    raw = {**SPEC, "categories": [SPEC["categories"][0], {**SPEC["categories"][1], "enabled": False}]}
    spec = PolicySpec.model_validate(raw)
    _, tables = build_tables(spec)
    assert tables.positive.shape[0] == 1


def test_version_ignores_layout_and_changes_with_content(tmp_path):
    a = write(tmp_path, """
        name: v
        categories: [{name: c, descriptions: [x], flag: 0.9, review: 0.5}]
    """, "a.yaml")  # fmt: skip
    b = write(tmp_path, """
        # a comment, other key order, other layout
        categories:
          - review: 0.5
            flag: 0.9
            descriptions:
              - "x"
            name: c
        name: v
    """, "b.yaml")  # fmt: skip
    c = write(tmp_path, """
        name: v
        categories: [{name: c, descriptions: [x], flag: 0.91, review: 0.5}]
    """, "c.yaml")  # fmt: skip
    va, vb, vc = (load_spec(p).version() for p in (a, b, c))
    assert va == vb != vc
    assert va.startswith("sha256:") and len(va) == len("sha256:") + 16


@pytest.mark.parametrize(
    "body,where,reason",
    [
        ("name: x\ncategories: [\n", "", "invalid YAML: line"),
        ("name: x\ncolour: red\ncategories: [{name: c, descriptions: [a], flag: 0.9, review: 0.5}]\n",
         "colour", "Extra inputs are not permitted"),
        ("name: x\ncategories: [{name: c, descriptions: [a], flag: 0.5, review: 0.9}]\n",
         "categories[0](c)", "review threshold 0.9 must not exceed flag threshold 0.5"),
        ("name: x\ncategories: [{name: c, descriptions: [a], flag: 1.5, review: 0.5}]\n",
         "categories[0](c).flag", "less than or equal to 1"),
        ("name: x\ncategories:\n - {name: c, descriptions: [a], flag: 0.9, review: 0.5}\n"
         " - {name: c, descriptions: [b], flag: 0.9, review: 0.5}\n", "", "duplicate category names: ['c']"),
        ("name: x\ncategories: [{name: c, descriptions: [], flag: 0.9, review: 0.5}]\n",
         "categories[0](c).descriptions", "at least 1 item"),
        ("name: x\ncategories: [{name: c, descriptions: ['  '], flag: 0.9, review: 0.5}]\n",
         "categories[0](c).descriptions", "empty text"),
        ("name: x\ntemplates: [a photo]\ncategories: [{name: c, descriptions: [a], flag: 0.9, review: 0.5}]\n",
         "templates", "exactly one {}"),
        ("name: Bad Name\ncategories: [{name: c, descriptions: [a], flag: 0.9, review: 0.5}]\n",
         "name", "should match pattern"),
        ("- just\n- a list\n", "", "expected a mapping at the top level"),
        ("name: x\ncategories: [{name: c, descriptions: [a, a], flag: 0.9, review: 0.5}]\n",
         "categories[0](c).descriptions", "duplicate texts"),
    ],
)  # fmt: skip
def test_invalid_files_give_precise_errors(tmp_path, body, where, reason):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(PolicyError) as info:
        load_spec(path)
    errors = info.value.errors
    assert any(f == str(path) and where in p and reason in r for f, p, r in errors), errors
    assert str(path) in str(info.value)


def test_shipped_pack_is_valid():
    files = policy_files([ROOT / "policies"])
    specs = {load_spec(p).name: load_spec(p) for p in files}
    assert {"community-standards", "kids-platform"} <= set(specs)
    cs = {c.name for c in specs["community-standards"].categories}
    assert {"sexual-content", "graphic-violence", "weapons", "drugs", "hate-symbols", "self-harm"} <= cs
    for spec in specs.values():
        for c in spec.categories:
            assert len(c.descriptions) >= 2 and c.contrasts


def test_stricter_surface_has_lower_thresholds():
    cs = load_spec(ROOT / "policies/community-standards.yaml")
    kids = load_spec(ROOT / "policies/kids-platform.yaml")
    general = {c.name: c for c in cs.categories}
    assert kids.categories[0].flag < general["sexual-content"].flag
    assert {c.name: c for c in kids.categories}["weapons"].review < general["weapons"].review


# --- scoring by hand -----------------------------------------------------------------------------


def test_score_logits_by_hand():
    spec = PolicySpec.model_validate(SPEC)
    _, tables = build_tables(spec)
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])  # gun, rifle, toy, blood, n1
    got = score_logits(logits, tables)[0].tolist()
    e = math.exp
    weapons = (e(2) + e(1)) / (e(2) + e(1) + e(0.5) + e(0))
    gore = e(-1) / (e(-1) + e(0))
    assert got == pytest.approx([weapons, gore], abs=1e-12)


def test_compiled_policy_scores_and_decides_by_hand():
    spec = PolicySpec.model_validate(SPEC)
    # Orthonormal text vectors in 5-D: cos(image, text_j) is the image's j-th coordinate.
    vectors = np.eye(5, dtype=np.float32)
    policy = assemble(spec, vectors, logit_scale=10.0, model="m@1")
    image = torch.tensor([[0.8, 0.0, 0.0, 0.0, 0.6], [0.0, 0.0, 0.0, 0.6, 0.8]])
    scores = policy.scores(image)
    e = math.exp
    w0 = (e(8) + e(0)) / (e(8) + e(0) + e(0) + e(6))  # gun=.8, rifle=0 (both counted), toy=0, n1=.6
    g0 = e(0) / (e(0) + e(6))
    w1 = (1 + 1) / (1 + 1 + 1 + e(8))
    g1 = e(6) / (e(6) + e(8))
    assert scores.tolist()[0] == pytest.approx([w0, g0], abs=1e-6)
    assert scores.tolist()[1] == pytest.approx([w1, g1], abs=1e-6)
    d0, d1 = policy.decide(scores)
    assert w0 >= 0.8 and d0.decision == "flag"
    assert d0.triggered[0].category == "weapons" and d0.triggered[0].rule == "flag"
    assert d0.triggered[0].threshold == 0.8
    assert d1.decision == "allow" and d1.triggered == []
    assert d0.policy.name == "test" and d0.policy.version == spec.version() and d0.model == "m@1"
    assert set(d0.scores) == {"weapons", "gore"}


def test_review_trigger_carries_severity_and_labels():
    spec = PolicySpec.model_validate(SPEC)
    policy = assemble(spec, np.eye(5, dtype=np.float32), logit_scale=1.0, model="m")
    (decision,) = policy.decide(np.array([[0.1, 0.7]]))
    assert decision.decision == "review"
    (t,) = decision.triggered
    assert (t.category, t.rule, t.threshold, t.severity, t.labels) == ("gore", "review", 0.6, "high",
                                                                        {"queue": "violence"})  # fmt: skip


def test_unknown_policy_is_a_typed_error():
    from moderator.policy import PolicySet

    spec = PolicySpec.model_validate(SPEC)
    ps = PolicySet({"test": assemble(spec, np.eye(5, dtype=np.float32), 1.0, "m")}, default=None)
    assert ps.get("test").spec.name == "test"
    with pytest.raises(UnknownPolicy, match="nope"):
        ps.get("nope")
    with pytest.raises(UnknownPolicy, match="no default"):
        ps.get(None)


# --- properties ----------------------------------------------------------------------------------

logit_rows = st.lists(st.floats(-100, 100, allow_nan=False), min_size=5, max_size=5)


@settings(max_examples=300, deadline=None)
@given(st.lists(logit_rows, min_size=1, max_size=8))
def test_scores_stay_in_unit_interval(rows):
    _, tables = build_tables(PolicySpec.model_validate(SPEC))
    scores = score_logits(torch.tensor(rows, dtype=torch.float64), tables)
    assert torch.isfinite(scores).all()
    assert ((scores >= 0) & (scores <= 1)).all()


thresholds = st.tuples(st.floats(0, 1), st.floats(0, 1)).map(lambda t: (max(t), min(t)))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.floats(0, 1), min_size=3, max_size=3),
    st.lists(thresholds, min_size=3, max_size=3),
    st.integers(0, 2),
    st.floats(0, 1),
)
def test_raising_a_threshold_never_turns_allow_into_flag(scores, ths, which, bump):
    s = np.array([scores])
    flag = np.array([f for f, _ in ths])
    review = np.array([r for _, r in ths])
    before = decide_batch(s, flag, review)[0]
    flag2, review2 = flag.copy(), review.copy()
    flag2[which] = min(1.0, flag2[which] + bump)
    review2[which] = min(flag2[which], review2[which] + bump)
    after = decide_batch(s, flag2, review2)[0]
    assert after <= before  # raising thresholds only ever lowers the outcome
    if before == 0:
        assert after == 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=3, max_size=3), st.lists(thresholds, min_size=3, max_size=3))
def test_decision_is_the_documented_function(scores, ths):
    raw = {
        "name": "p",
        "categories": [
            {"name": f"c{i}", "descriptions": [f"d{i}"], "flag": f, "review": r} for i, (f, r) in enumerate(ths)
        ],
    }
    policy = assemble(PolicySpec.model_validate(raw), np.eye(3, dtype=np.float32), 1.0, "m")
    (d,) = policy.decide(np.array([scores]))
    if any(s >= f for s, (f, _) in zip(scores, ths, strict=True)):
        expected = "flag"
    elif any(s >= r for s, (_, r) in zip(scores, ths, strict=True)):
        expected = "review"
    else:
        expected = "allow"
    assert d.decision == expected
    fired = {(t.category, t.rule) for t in d.triggered}
    for i, (s, (f, r)) in enumerate(zip(scores, ths, strict=True)):
        rule = "flag" if s >= f else "review" if s >= r else None
        assert ((f"c{i}", rule) in fired) == (rule is not None)
