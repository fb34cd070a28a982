"""Wire formats: what moderator publishes (decisions), as pydantic models with a JSON schema."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Outcome = Literal["flag", "review", "allow"]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PolicyRef(_Record):
    name: str
    version: str = Field(description="content hash of the policy's normalized form")


class Trigger(_Record):
    """A rule that fired: the category's score reached the threshold of that rule."""

    category: str
    rule: Literal["flag", "review"]
    score: float
    threshold: float
    severity: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)


class Decision(_Record):
    """The outcome for one image under one policy, with everything that produced it."""

    decision: Outcome
    scores: dict[str, float] = Field(description="every enabled category's score in [0, 1]")
    triggered: list[Trigger] = Field(description="the rules that fired, strongest first")
    policy: PolicyRef
    model: str = Field(description="model fingerprint: checkpoint id and revision, or a hash of the weights")
