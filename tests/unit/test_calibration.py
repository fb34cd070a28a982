"""Calibration maths on synthetic verdicts with a known truth, and threshold rewriting of policy files.

Each trial draws a day of traffic: a violation with probability PI, its score from Beta(5, 2), a
benign image's from Beta(2, 5). The current thresholds split it into allow / review / flag; every
review decision is judged, allow and flag ones by audit at known rates. The true precision and
recall of any threshold are known exactly from the two distributions.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import beta

from moderator.calibration import Judged, curve, lower_bound, propose_flag, propose_review
from moderator.policy import PolicyError, parse_spec
from moderator.policy.rewrite import set_thresholds

PI = 0.1
TRIALS = 200
CONFIDENCE = 0.95


def true_precision(t: float) -> float:
    tp, fp = PI * beta.sf(t, 5, 2), (1 - PI) * beta.sf(t, 2, 5)
    return float(tp / (tp + fp))


def true_recall(t: float) -> float:
    return float(beta.sf(t, 5, 2))


def day(rng: np.random.Generator, n: int, review: float, flag: float, allow_rate: float, flag_rate: float) -> Judged:
    violation = rng.random(n) < PI
    scores = np.where(violation, rng.beta(5, 2, n), rng.beta(2, 5, n))
    rate = np.where(scores < review, allow_rate, np.where(scores >= flag, flag_rate, 1.0))
    judged = rng.random(n) < rate
    return Judged(scores[judged], violation[judged], 1.0 / rate[judged], rate[judged] < 1.0)


SCENARIOS = {
    # Thresholds set too high: the precision target is reached inside today's allow band.
    "too-strict": dict(n=10_000, review=0.6, flag=0.9, allow_rate=0.02, flag_rate=0.1, precision=0.5, recall=0.9),
    # A high precision target inside the flag band, a recall target inside the review band.
    "high-target": dict(n=20_000, review=0.4, flag=0.7, allow_rate=0.02, flag_rate=0.1, precision=0.9, recall=0.8),
}


def trials(name: str, weighted: bool) -> tuple[list[float], list[float]]:
    """The true precision at each proposed flag threshold, and the true recall at each review one."""
    s = dict(SCENARIOS[name])
    precision_target, recall_target = s.pop("precision"), s.pop("recall")
    rng = np.random.default_rng(20261129)
    precisions, recalls = [], []
    for _ in range(TRIALS):
        judged = day(rng, **s)
        c = curve(judged if weighted else judged.unweighted())
        flag = propose_flag(c, precision_target, CONFIDENCE, 30)
        review = propose_review(c, recall_target, CONFIDENCE, 30)
        if flag.threshold is not None:
            precisions.append(true_precision(flag.threshold))
        if review.threshold is not None:
            recalls.append(true_recall(review.threshold))
    return precisions, recalls


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_proposals_meet_their_targets_in_at_least_95_percent_of_trials(name: str) -> None:
    precisions, recalls = trials(name, weighted=True)
    target = SCENARIOS[name]
    assert len(precisions) >= 0.9 * TRIALS and len(recalls) >= 0.9 * TRIALS  # a proposal nearly every day
    met_precision = np.mean(np.array(precisions) >= target["precision"])
    met_recall = np.mean(np.array(recalls) >= target["recall"])
    print(f"{name}: precision met in {met_precision:.1%} of {len(precisions)}, recall in {met_recall:.1%}")
    assert met_precision >= 0.95 and met_recall >= 0.95


def test_without_the_inverse_probability_weights_the_same_procedure_misses_badly() -> None:
    """Unweighted, the review band (judged in full) stands for all traffic: below it the few audit
    samples count as one image each instead of fifty, so precision there looks far higher and recall
    far better than they are."""
    precisions, recalls = trials("too-strict", weighted=False)
    target = SCENARIOS["too-strict"]
    assert np.mean(np.array(precisions) >= target["precision"]) < 0.2
    assert np.mean(np.array(recalls) >= target["recall"]) < 0.2


def test_too_few_verdicts_give_no_proposal_and_say_how_many_more() -> None:
    rng = np.random.default_rng(5)
    judged = day(rng, 600, review=0.6, flag=0.9, allow_rate=0.02, flag_rate=0.1)
    c = curve(judged)
    flag = propose_flag(c, 0.97, CONFIDENCE, 30)
    assert flag.threshold is None and flag.needed.startswith("about ") and "more verdicts" in flag.needed
    few = Judged(judged.scores[:8], judged.positive[:8], judged.weight[:8], judged.sampled[:8])
    review = propose_review(curve(few), 0.9, CONFIDENCE, 30)
    positives = int(few.positive.sum())
    assert review.threshold is None and review.needed == f"{30 - positives} more confirmed violations"
    assert propose_flag(curve(Judged(*(np.zeros(0),) * 4)), 0.9, CONFIDENCE, 30).reason == "no verdicts"


def test_clopper_pearson_bounds_are_exact_on_unweighted_counts() -> None:
    assert lower_bound(1.0, 20, 0.95)[()] == pytest.approx(0.05 ** (1 / 20))  # all successes: α^(1/n)
    assert lower_bound(0.5, 10, 0.95)[()] == pytest.approx(beta.ppf(0.05, 5, 6))
    assert lower_bound(0.0, 10, 0.95)[()] == 0.0


def test_the_weighted_curve_counts_each_verdict_by_its_weight() -> None:
    j = Judged(np.array([0.9, 0.8, 0.8, 0.2]), np.array([True, False, True, True]), np.array([1.0, 1.0, 1.0, 50.0]),
               np.array([False, False, False, True]))  # fmt: skip
    c = curve(j)
    assert c.thresholds.tolist() == [0.9, 0.8, 0.2]  # ties make one point
    assert c.tp.tolist() == [1.0, 2.0, 52.0] and c.fp.tolist() == [0.0, 1.0, 1.0]
    assert c.recall.tolist() == pytest.approx([1 / 52, 2 / 52, 1.0])


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


def test_the_share_of_each_stratum_judged_is_measured_on_the_log() -> None:
    """Half the review decisions judged, a quarter of the audit samples: the shares that scale the weights."""
    from moderator.calibrate import judged_shares
    from moderator.events import Decision, PolicyRef, Verdict
    from moderator.policy import audit_draw

    spec = parse_spec(POLICY + "audit: {allow: 0.5, flag: 0.0}\n", "p.yaml")
    ids = [f"e{i}" for i in range(400)]
    outcomes = ["review" if i % 4 == 0 else "allow" for i in range(400)]
    live = [{"decision": o, "policy": {"name": "p"}} for o in outcomes]
    live[1] = {"decision": "review", "policy": {"name": "another"}}  # another policy's: not counted
    sampled = [e for e, o in zip(ids, outcomes, strict=True) if o == "allow" and audit_draw(e) < 0.5]
    reviews = [e for e, o, x in zip(ids, outcomes, live, strict=True) if o == "review" and x["policy"]["name"] == "p"]

    def verdict(eid: str, decision: str, rate: float | None) -> Verdict:
        judged = Decision(
            decision=decision, scores={}, triggered=[], policy=PolicyRef(name="p", version="v"), model="m"
        )
        return Verdict(event_id=eid, verdict="overturn", reviewer="r", judged=judged, sampled=rate is not None,
                       sample_rate=rate, decided_at="t", reviewed_at="t")  # fmt: skip

    verdicts = [verdict(e, "review", None) for e in reviews[::2]] + [verdict(e, "allow", 0.5) for e in sampled[::4]]
    shares = judged_shares(spec, ids, live, verdicts)
    assert shares["review"] == pytest.approx(len(reviews[::2]) / len(reviews))
    assert shares["audit_samples"] == pytest.approx(len(sampled[::4]) / len(sampled))
    assert judged_shares(spec, ids, live, []) == {"review": None, "audit_samples": None}
