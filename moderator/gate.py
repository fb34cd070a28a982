"""The precision gate, where the engine meets the policies: do decisions survive the reduced precision?

When a reduced-precision image tower (bf16, int8) was built, the engine embedded the probe set with it
and with the fp32 tower, and kept it only if every probe embedding's cosine with its fp32 one reached
``MODERATOR_PRECISION_MIN_COSINE`` (:class:`moderator.precision.Probe`). A cosine cannot say whether
decisions move: a threshold may sit where a small error flips outcomes. So for every loaded policy,
live and shadow, the gate decides the probe images from both sets of embeddings and measures the share
with the same outcome. Below ``MODERATOR_PRECISION_MIN_AGREEMENT`` for any policy, the engine falls
back to fp32 (logged with the policy and the figures, counted in
``moderator_precision_fallbacks_total``); the figures are in ``moderator_precision_gate_agreement``.

When it runs (:class:`moderator.app.App` wires it): at start-up, before the first policy set serves;
for the single policy file of ``classify --policy`` and ``policy explain``; and on every policy
reload, *before* the new set serves (the registry's ``before_swap`` hook): a policy edit whose
decisions the reduced tower cannot reproduce never runs on it. The probe embeddings are kept from the
load, so a check is two small matrix products per policy. A fallback lasts until the worker restarts.
"""

from __future__ import annotations

from collections.abc import Iterable

from moderator.clip import ClipEngine
from moderator.observability import PRECISION_AGREEMENT, get_logger
from moderator.policy import CompiledPolicy, PolicySet, decide_batch
from moderator.precision import Probe

log = get_logger(__name__)


def agreement(policy: CompiledPolicy, probe: Probe) -> float:
    """The share of probe images whose outcome (flag, review, allow) under ``policy`` is the same from
    the reduced-precision embeddings as from the fp32 ones."""
    if len(probe.reference) == 0:
        return 1.0
    ref = decide_batch(policy.scores(probe.reference), policy.flag, policy.review)
    got = decide_batch(policy.scores(probe.candidate), policy.flag, policy.review)
    return float((ref == got).mean())


def policies_of(policy_set: PolicySet) -> list[CompiledPolicy]:
    """Every policy of a set: the live ones and their shadows."""
    return [*policy_set.policies.values(), *(s for shadows in policy_set.shadows.values() for s in shadows)]


class PrecisionGate:
    """Checks policies against an engine's probe set; falls the engine back to fp32 below the floor."""

    def __init__(self, engine: ClipEngine, min_agreement: float) -> None:
        self.engine = engine
        self.min_agreement = min_agreement
        self.last: dict[str, float] = {}  # the agreement of each policy last checked

    def check(self, policies: Iterable[CompiledPolicy]) -> dict[str, float]:
        """Each policy's agreement; falls back when one is below the floor. Nothing to check (an empty
        dict) when no reduced precision is serving (fp32 asked for, or already fallen back)."""
        engine, probe = self.engine, self.engine.probe
        if probe is None or engine.tower is engine.base:
            return {}
        figures = {p.spec.name: round(agreement(p, probe), 6) for p in policies}
        for name, value in figures.items():
            PRECISION_AGREEMENT.labels(precision=probe.precision, policy=name).set(value)
        self.last.update(figures)
        below = {n: v for n, v in figures.items() if v < self.min_agreement}
        if below:
            name, value = min(below.items(), key=lambda kv: kv[1])
            changed = round((1 - value) * len(probe.reference))
            engine.fall_back(
                f"{probe.precision} under policy {name}: {changed} of {len(probe.reference)} probe decisions differ"
                f" from float32 (agreement {value:.2%}, below the floor {self.min_agreement:.2%},"
                " MODERATOR_PRECISION_MIN_AGREEMENT)",
                "agreement",
            )
        elif figures:
            log.info("precision_gate_passed", image_precision=engine.precision, agreement=figures,
                     min_agreement_floor=self.min_agreement, **probe.figures())  # fmt: skip
        return figures

    def check_set(self, policy_set: PolicySet) -> None:
        """The registry's ``before_swap`` hook: every policy of the set about to serve."""
        self.check(policies_of(policy_set))
