"""Comparing two policies' decisions (what replay and shadow report), by hand-computed examples."""

from __future__ import annotations

import numpy as np
import pytest

from moderator.comparison import Side, check, compare, parse_fail_if, unstable_within

CATS = ("weapons", "gore")


def _side(scores, flag=(0.9, 0.8), review=(0.6, 0.5)):
    return Side.from_scores(np.array(scores, dtype=float), CATS, np.array(flag), np.array(review))


def test_the_decision_rule_and_the_transition_matrix():
    scores = [[0.95, 0.1], [0.7, 0.1], [0.1, 0.55], [0.1, 0.1], [0.65, 0.85]]
    base = _side(scores)
    assert base.codes.tolist() == [2, 1, 1, 0, 2]
    lowered = _side(scores, flag=(0.68, 0.8))  # weapons flags from 0.68: events 1 (0.7) changes
    c = compare(["a", "b", "c", "d", "e"], base, lowered)
    assert c.transitions == {"review->flag": 1} and c.examples == {"review->flag": ["b"]}
    assert c.matrix["flag->flag"] == 2 and sum(c.matrix.values()) == 5
    weapons = c.categories[0]
    assert (weapons.flag_up, weapons.flag_down, weapons.review_up, weapons.review_down) == (1, 0, 0, 0)
    assert c.baseline_volume == {"allow": 1, "review": 2, "flag": 2}
    assert c.candidate_volume == {"allow": 1, "review": 1, "flag": 3}
    m = c.metrics()
    assert m["review->flag"] == pytest.approx(0.2) and m["changed"] == pytest.approx(0.2)
    assert m["review_volume_increase"] == pytest.approx(-0.5) and m["flag_volume_increase"] == pytest.approx(0.5)
    assert m["flag_recall_drop"] == 0.0


def test_identical_sides_have_no_transitions():
    side = _side(np.random.default_rng(0).uniform(size=(200, 2)))
    c = compare([str(i) for i in range(200)], side, side)
    assert c.transitions == {} and c.borderline == {} and c.metrics()["changed"] == 0


def test_categories_the_candidate_drops_or_adds():
    base = _side([[0.95, 0.9], [0.1, 0.6]])
    cand = Side.from_scores(np.array([[0.95], [0.1]]), ("weapons",), np.array([0.9]), np.array([0.6]))
    c = compare(["a", "b"], base, cand)
    gore = next(x for x in c.categories if x.category == "gore")
    assert (gore.flag_down, gore.review_down) == (1, 2)
    assert c.transitions == {"review->allow": 1}
    assert c.metrics()["flag_recall_drop"] == 0.0  # "a" is still flagged, by weapons


def test_changes_within_the_tolerance_of_a_threshold_are_borderline():
    scores = np.array([[0.9004, 0.1], [0.95, 0.1], [0.5, 0.1]])
    flag, review = np.array([0.9, 0.8]), np.array([0.6, 0.5])
    unstable = unstable_within(scores, flag, review, tolerance=1e-3)
    assert unstable.tolist() == [True, False, False]
    base = Side(np.array([1, 2, 0]), CATS, np.zeros((3, 2), bool), np.zeros((3, 2), bool))
    cand = Side.from_scores(scores, CATS, flag, review)
    c = compare(["near", "far", "same"], base, cand, unstable=unstable, tolerance=1e-3)
    assert c.borderline == {"review->flag": 1} and c.transitions == {}
    assert c.examples == {"review->flag": ["near"]}
    assert unstable_within(scores, flag, review, 0.0).tolist() == [False, False, False]


def test_fail_if_expressions():
    known = {"flag_recall_drop", "review_volume_increase", "allow->flag"}
    cond = [parse_fail_if(e, known) for e in ("flag_recall_drop>0.02", "review_volume_increase >= 0.2",
                                               "allow->flag<0")]  # fmt: skip
    assert check(cond, {"flag_recall_drop": 0.02, "review_volume_increase": 0.25, "allow->flag": 0.0}) == [
        "review_volume_increase >= 0.2 (0.25)"
    ]
    assert check(cond, {"flag_recall_drop": 0.021, "review_volume_increase": 0.0, "allow->flag": 0.0}) == [
        "flag_recall_drop>0.02 (0.021)"
    ]
    for bad in ("flag_recall_drop", "nope>1", "flag_recall_drop>>1", "flag_recall_drop>x"):
        with pytest.raises(ValueError, match="--fail-if"):
            parse_fail_if(bad, known)


def test_verdict_metrics_weight_audit_samples_by_their_inverse_rate():
    from moderator.comparison import verdict_metrics

    codes = np.array([2, 2, 1, 0, 0])  # flag, flag, review, allow, allow
    violation = np.array([True, False, True, True, False])
    weight = np.array([1.0, 1.0, 1.0, 100.0, 100.0])  # the two allows are audit samples at 1%
    m = verdict_metrics(codes, violation, weight)
    assert m["flag_precision"] == 0.5  # 1 of the 2 flags
    assert m["flag_recall"] == round(1 / 102, 4)  # the sampled allow that was a violation stands for 100
    assert m["caught_recall"] == round(2 / 102, 4)
    assert verdict_metrics(np.array([0]), np.array([False]), np.array([1.0]))["flag_precision"] is None
