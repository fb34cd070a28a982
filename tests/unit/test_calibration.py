"""Calibration maths, pure: the bounds on counts (exact where they must be, conservative against the
hypergeometric), the counts per stratum, the proposals' messages, reviewer agreement; and threshold
rewriting of policy files. Whether the whole procedure holds its level is
``test_calibration_validity.py``'s business.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy.stats import beta, hypergeom

from moderator.calibration import (
    PENDING,
    Population,
    Stratum,
    candidates,
    cohens_kappa,
    counts,
    precision_bounds,
    propose_flag,
    propose_review,
    recall_bounds,
    violations_lower,
    violations_upper,
    with_disagreement,
)
from moderator.policy import PolicyError, parse_spec
from moderator.policy.rewrite import set_thresholds

from .test_calibration_validity import SCENARIOS, window

CONFIDENCE = 0.95


def test_the_binomial_bounds_are_conservative_for_sampling_without_replacement() -> None:
    """Exactly, not by simulation: for every population size N, sample size n and true count K on a
    grid, the probability (hypergeometric) that the lower bound exceeds K, or the upper one falls below
    it, is at most alpha."""
    alpha = 0.05
    worst_lower = worst_upper = 0.0
    for big_n in (5, 20, 60, 200, 1000):
        for n in sorted({1, 2, 3, 5, 10, 30, 100, 300, big_n // 2, big_n - 1}):
            if not 0 < n < big_n:
                continue
            ks = np.arange(n + 1)
            lower = violations_lower(ks, np.full(n + 1, n), np.full(n + 1, big_n), alpha)
            upper = violations_upper(ks, np.full(n + 1, n), np.full(n + 1, big_n), alpha)
            for true in range(0, big_n + 1, max(1, big_n // 100)):
                pmf = hypergeom.pmf(ks, big_n, true, n)
                worst_lower = max(worst_lower, float(pmf[lower > true].sum()))
                worst_upper = max(worst_upper, float(pmf[upper < true].sum()))
    assert worst_lower <= alpha + 1e-12 and worst_upper <= alpha + 1e-12, (worst_lower, worst_upper)


def test_bounds_are_exact_for_a_part_judged_whole_and_empty_for_one_never_drawn() -> None:
    k, n, big_n = np.array([3, 3, 0, 2]), np.array([10, 0, 0, 4]), np.array([10, 50, 7, 400])
    assert violations_lower(k, n, big_n, 0.05).tolist() == [3, 0, 0, np.ceil(400 * beta.ppf(0.05, 2, 3))]
    assert violations_upper(k, n, big_n, 0.05).tolist()[:3] == [3, 50, 7]
    # the Clopper-Pearson bound times the size, never below what was seen
    assert violations_lower(np.array([5]), np.array([10]), np.array([1000]), 0.05)[0] == np.ceil(
        1000 * beta.ppf(0.05, 5, 6)
    )
    assert violations_upper(np.array([0]), np.array([10]), np.array([12]), 0.05)[0] <= 2  # 10 seen benign


def _pop() -> Population:
    """Six decisions: a review band judged whole (one still waiting), an allow band sampled at 1/2."""
    scores = np.array([0.9, 0.8, 0.7, 0.4, 0.3, 0.2])
    strata = (Stratum("review", 1.0), Stratum("allow", 0.5))
    stratum = np.array([0, 0, 0, 1, 1, 1])
    selected = np.array([True, True, True, True, False, True])
    label = np.array([1, 0, PENDING, 1, PENDING, 0], dtype=np.int8)
    return Population(scores, stratum, strata, selected, label)


def test_counts_per_stratum_at_or_above_and_below_each_threshold() -> None:
    pop = _pop()
    assert candidates(pop).tolist() == [0.9, 0.8, 0.4, 0.2]  # judged scores only: 0.7 waits, 0.3 not drawn
    c = counts(pop, np.array([0.8, 0.4]))
    assert c.above.population.tolist() == [[2, 0], [3, 1]] and c.below.population.tolist() == [[1, 3], [0, 2]]
    assert c.above.selected.tolist() == [[2, 0], [3, 1]] and c.above.pending.tolist() == [[0, 0], [1, 0]]
    assert c.above.positive.tolist() == [[1, 0], [1, 1]] and c.below.positive.tolist() == [[0, 1], [0, 0]]
    assert c.share_above.tolist() == [2 / 6, 4 / 6]
    estimate, lower = precision_bounds(c, CONFIDENCE)
    assert estimate[0] == 0.5 and lower[0] == 0.5  # the review part is a census: exact
    # at 0.4: the waiting review decision counts as no violation in the bound, not in the estimate
    assert estimate[1] == pytest.approx((1 * 3 / 2 + 1) / 4) and lower[1] == pytest.approx(2 / 4)
    recall_estimate, recall_lower = recall_bounds(c, CONFIDENCE)
    assert 0 <= recall_lower[0] <= recall_estimate[0] <= 1


def test_a_population_is_checked_against_its_design() -> None:
    pop = _pop()
    with pytest.raises(ValueError, match="drawn for review"):
        replace(pop, label=np.array([1, 0, 0, 1, 1, 0], dtype=np.int8))  # a verdict on a decision never drawn
    with pytest.raises(ValueError, match="probability 1"):
        replace(pop, selected=np.array([True, False, True, True, False, True]), label=np.full(6, PENDING, np.int8))
    with pytest.raises(ValueError, match="one value per decision"):
        replace(pop, scores=pop.scores[:3])


def test_without_the_sampling_design_the_same_procedure_misses_badly() -> None:
    """The verdicts taken as if they were the traffic (one stratum, every judged decision counted once):
    the review band, judged whole, stands for all traffic, and the few audit samples below it count as one
    decision each instead of fifty, so precision there looks far higher and recall far better."""
    s = SCENARIOS["p10-audit2/10-target-in-allow-band"]
    rng = np.random.default_rng(20261202)
    met_precision = met_recall = 0
    trials = 40
    for _ in range(trials):
        w = window(s, rng)
        judged = w.pop.judged
        naive = Population(w.pop.scores[judged], np.zeros(int(judged.sum()), dtype=int), (Stratum("all", 1.0),),
                           np.ones(int(judged.sum()), dtype=bool), w.pop.label[judged])  # fmt: skip
        c = counts(naive, candidates(naive))
        flag = propose_flag(c, s.precision or 0, CONFIDENCE, 30)
        review = propose_review(c, s.recall or 0, CONFIDENCE, 30)
        met_precision += flag.threshold is not None and w.precision(flag.threshold) >= (s.precision or 0)
        met_recall += review.threshold is not None and w.recall(review.threshold) >= (s.recall or 0)
    assert met_precision / trials < 0.2 and met_recall / trials < 0.2


def test_no_proposal_says_why_and_what_would_make_one() -> None:
    rng = np.random.default_rng(5)
    w = window(replace(SCENARIOS["p10-audit2/10-target-in-allow-band"], n=3_000), rng)
    c = counts(w.pop, candidates(w.pop))
    flag = propose_flag(c, 0.97, CONFIDENCE, 30)
    assert flag.threshold is None and "lower bound" in flag.reason
    assert "audit flag decisions at about" in flag.needed and "more verdicts scoring >=" in flag.needed
    beyond_eight = (w.pop.label == 1) & (np.cumsum(w.pop.label == 1) > 8)
    few = replace(w.pop, label=np.where(beyond_eight, 0, w.pop.label).astype(np.int8))
    review = propose_review(counts(few, candidates(few)), 0.9, CONFIDENCE, 30)
    assert review.threshold is None and review.needed == "22 more confirmed violations"
    empty = Population(np.zeros(0), np.zeros(0, dtype=int), (), np.zeros(0, dtype=bool), np.zeros(0, dtype=np.int8))
    assert propose_flag(counts(empty, candidates(empty)), 0.9, CONFIDENCE, 30).reason == "no verdicts"
    # A stratum never sampled: nothing but setting its audit rate helps.
    never = Population(np.array([0.9] * 40 + [0.8] * 40), np.array([0] * 40 + [1] * 40),
                       (Stratum("review", 1.0), Stratum("flag", 0.0)), np.array([True] * 40 + [False] * 40),
                       np.array([1] * 40 + [PENDING] * 40, dtype=np.int8))  # fmt: skip
    # (the flag decisions score below the review ones here: a policy edit)
    flag = propose_flag(counts(never, candidates(never)), 0.9, CONFIDENCE, 30)
    assert flag.threshold is not None  # at 0.9 the census alone: 40 of 40
    low = propose_flag(counts(never, np.array([0.8])), 0.9, CONFIDENCE, 30)
    assert low.threshold == 0.8 or "audit.flag" in low.needed


def test_cohens_kappa_and_the_disagreement_what_if() -> None:
    a = np.array([1, 1, 1, 0, 0, 0, 1, 0], dtype=bool)
    b = np.array([1, 1, 0, 0, 0, 1, 1, 0], dtype=bool)
    assert cohens_kappa(a, b) == pytest.approx(0.5)  # observed 0.75, chance 0.5
    assert cohens_kappa(a, a) == 1.0 and cohens_kappa(np.zeros(0), np.zeros(0)) is None
    w = window(SCENARIOS["p10-audit2/10-target-in-allow-band"], np.random.default_rng(1))
    c = counts(w.pop, candidates(w.pop))
    lower = precision_bounds(c, CONFIDENCE)[1]
    shaken = precision_bounds(with_disagreement(c, 0.1), CONFIDENCE)[1]
    assert np.all(shaken <= lower + 1e-12) and np.any(shaken < lower)
    assert np.all(recall_bounds(with_disagreement(c, 0.1), CONFIDENCE)[1] <= recall_bounds(c, CONFIDENCE)[1] + 1e-12)


POLICY = """\
# the pack's weapons policy
name: p
categories:
  # guns first
  - name: weapons
    descriptions: [a handgun]
    flag: 0.90   # tuned by hand in March
    review: 0.60
  - {name: drugs, descriptions: [pills], flag: 0.8, review: 0.5}
"""


def test_thresholds_are_rewritten_in_place_keeping_comments_and_layout() -> None:
    out = set_thresholds(POLICY, {"weapons": {"flag": 0.8312}, "drugs": {"review": 0.45}}, "p.yaml")
    assert out == POLICY.replace("flag: 0.90   #", "flag: 0.8312   #").replace("review: 0.5}", "review: 0.45}")
    spec = parse_spec(out, "p.yaml")
    assert (spec.categories[0].flag, spec.categories[1].review) == (0.8312, 0.45)
    with pytest.raises(PolicyError, match="must not exceed"):
        set_thresholds(POLICY, {"weapons": {"review": 0.95}}, "p.yaml")
    with pytest.raises(PolicyError, match="no categories"):
        set_thresholds(POLICY, {"nope": {"flag": 0.5}}, "p.yaml")


def test_calibration_targets_do_not_change_the_policy_version() -> None:
    with_target = POLICY.replace("    review: 0.60\n", "    review: 0.60\n    target: {precision: 0.9, recall: 0.8}\n")
    spec = parse_spec(with_target, "p.yaml")
    assert spec.categories[0].target is not None and spec.categories[0].target.precision == 0.9
    assert spec.version() == parse_spec(POLICY, "p.yaml").version()


def test_recall_is_refused_where_the_allow_band_went_unsampled_in_part_of_the_window() -> None:
    """The audit was off (allow rate 0) for half of the window: the violations the model let through in
    that half are unknowable, so there is no review proposal, and the message says what to set."""
    w = window(SCENARIOS["p10-audit2/10-target-in-allow-band"], np.random.default_rng(9))
    pop = w.pop
    allow = pop.stratum == 0
    off = allow & (np.arange(len(pop.scores)) % 2 == 0)  # every other allow decision: the audit was off
    strata = (*pop.strata, Stratum("allow", 0.0))
    stratum = np.where(off, len(pop.strata), pop.stratum)
    unsampled = Population(pop.scores, stratum, strata, pop.selected & ~off,
                           np.where(off, PENDING, pop.label).astype(np.int8))  # fmt: skip
    c = counts(unsampled, candidates(unsampled))
    assert propose_review(counts(pop, candidates(pop)), 0.9, CONFIDENCE, 30).threshold is not None  # with it on
    review = propose_review(c, 0.9, CONFIDENCE, 30)
    assert review.threshold is None and "never sampled" in review.needed and "audit.allow" in review.needed
