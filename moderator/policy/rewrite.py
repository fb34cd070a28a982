"""Changing a policy file's thresholds in its text: comments, order, quoting and layout kept.

The YAML is composed (not loaded) to find where each category's ``flag`` and ``review`` values sit,
and exactly those characters are replaced; the result is validated, and must differ from the
original in those thresholds only.
"""

from __future__ import annotations

from collections.abc import Mapping

import yaml

from moderator.policy.spec import PolicyError, PolicySpec, parse_spec


def set_thresholds(text: str, changes: Mapping[str, Mapping[str, float]], where: str = "<policy>") -> str:
    """``text`` with ``changes[category][flag|review]`` written in; :class:`PolicyError` if the
    result is invalid (a review threshold above the flag one) or a category or key is missing."""
    root = yaml.compose(text)
    if not isinstance(root, yaml.MappingNode):
        raise PolicyError([(where, "", "expected a mapping at the top level")])
    categories = next((v for k, v in root.value if k.value == "categories"), None)
    if not isinstance(categories, yaml.SequenceNode):
        raise PolicyError([(where, "categories", "not a list")])
    spans: list[tuple[int, int, str]] = []
    wanted = {name: dict(fields) for name, fields in changes.items()}
    for node in categories.value:
        if not isinstance(node, yaml.MappingNode):
            continue
        fields = {k.value: v for k, v in node.value}
        name_node = fields.get("name")
        fields_wanted = wanted.pop(name_node.value, None) if isinstance(name_node, yaml.ScalarNode) else None
        for key, value in (fields_wanted or {}).items():
            scalar = fields.get(key)
            if not isinstance(scalar, yaml.ScalarNode):
                raise PolicyError([(where, f"categories({fields['name'].value}).{key}", "no such threshold")])
            spans.append((scalar.start_mark.index, scalar.end_mark.index, _number(value)))
    if wanted:
        raise PolicyError([(where, "categories", f"no categories {sorted(wanted)}")])
    out = text
    for start, end, new in sorted(spans, reverse=True):
        out = out[:start] + new + out[end:]
    _check(parse_spec(text, where), parse_spec(out, where), changes, where)
    return out


def _number(value: float) -> str:
    return f"{value:.4f}".rstrip("0").rstrip(".") if value not in (0.0, 1.0) else f"{value:.1f}"


def _check(before: PolicySpec, after: PolicySpec, changes: Mapping[str, Mapping[str, float]], where: str) -> None:
    categories = [
        c.model_copy(update={k: float(_number(v)) for k, v in changes.get(c.name, {}).items()})
        for c in before.categories
    ]
    if after != before.model_copy(update={"categories": categories}):
        raise PolicyError([(where, "", "rewriting the thresholds changed more than the thresholds")])
