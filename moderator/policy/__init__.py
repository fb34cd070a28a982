"""Policies: the file format, compilation into one text matrix, batch scoring, decisions, reload.

A policy file (YAML) names categories in plain language: what each looks like (descriptions),
benign look-alikes (contrasts), and thresholds. Scoring, for an image embedding ``x`` and each
category ``c`` (all embeddings L2-normalized, ``s`` the model's logit scale)::

    candidates(c) = descriptions(c) ∪ contrasts(c) ∪ neutral        (each an ensemble over templates)
    p_j           = exp(s·cos(x, t_j)) / Σ_{k ∈ candidates(c)} exp(s·cos(x, t_k))
    score(c)      = Σ_{j ∈ descriptions(c)} p_j

i.e. the softmax probability mass the category's descriptions take in its own candidate set: the
reference zero-shot pipeline's probability when the candidate set is the same. Decision: ``flag``
if any enabled category reaches its flag threshold, else ``review`` if any reaches its review
threshold, else ``allow``.

The pure part (schema, :func:`score_logits`, :func:`decide`) needs no model; :func:`compile_policy`
needs a :class:`~moderator.embedding_cache.TextEncoder`.

Modules: ``spec.py`` (the file format), ``scoring.py`` (compile, score, decide, explain),
``registry.py`` (the served set, the default policy, hot reload).
"""

from moderator.policy.registry import InvalidPolicy, PolicyRegistry, PolicySet, default_policy, default_problem
from moderator.policy.scoring import (
    OUTCOMES,
    CompiledPolicy,
    ScoringTables,
    assemble,
    build_tables,
    compile_policy,
    decide_batch,
    ensemble_texts,
    explain,
    explanations,
    score_logits,
)
from moderator.policy.spec import (
    NAME_RE,
    POLICY_SUFFIXES,
    Audit,
    Category,
    PolicyError,
    PolicySpec,
    Problem,
    UnknownPolicy,
    audit_draw,
    load_spec,
    parse_spec,
    policy_files,
)

__all__ = [
    "NAME_RE",
    "OUTCOMES",
    "POLICY_SUFFIXES",
    "Audit",
    "Category",
    "CompiledPolicy",
    "InvalidPolicy",
    "PolicyError",
    "PolicyRegistry",
    "PolicySet",
    "PolicySpec",
    "Problem",
    "ScoringTables",
    "UnknownPolicy",
    "assemble",
    "audit_draw",
    "build_tables",
    "compile_policy",
    "decide_batch",
    "default_policy",
    "default_problem",
    "ensemble_texts",
    "explain",
    "explanations",
    "load_spec",
    "parse_spec",
    "policy_files",
    "score_logits",
]
