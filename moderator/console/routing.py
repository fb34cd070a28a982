"""Named review queues and the rules that route items into them, pure.

``MODERATOR_CONSOLE_QUEUES``: the queues and who may work them, e.g.
``[{"name": "csam-leads", "roles": ["lead", "admin"]}, {"name": "audit"}]`` (roles default to all).
``MODERATOR_CONSOLE_ROUTES``: rules evaluated in order, the first that matches names the item's queue;
every condition given must hold (``policy``, ``category``: one of the categories that fired,
``decision``, ``sampled``, ``retroactive``), e.g.
``[{"category": "self-harm", "queue": "csam-leads"}, {"sampled": true, "queue": "audit"}]``. An item no
rule matches goes to ``MODERATOR_CONSOLE_DEFAULT_QUEUE`` (``default``), which every role may work.
Appeals go to the ``appeals`` queue (leads and admins) unless a rule with ``"appeal": true`` matches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from moderator.console.auth import ROLES, Role
from moderator.events import ReviewItem

APPEALS = "appeals"  # where appeals go unless a route with "appeal": true says otherwise (leads, admins)


class QueueSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    roles: tuple[Role, ...] = ROLES


class RouteSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    queue: str
    policy: str | None = None
    category: str | None = None
    decision: str | None = None
    sampled: bool | None = None
    retroactive: bool | None = None
    appeal: bool | None = None

    def matches(self, item: ReviewItem) -> bool:
        return (
            (self.appeal is None or (item.appeal_id is not None) == self.appeal)
            and (self.policy is None or item.policy.name == self.policy)
            and (self.category is None or any(r.category == self.category for r in item.reasons))
            and (self.decision is None or item.decision == self.decision)
            and (self.sampled is None or item.sampled == self.sampled)
            and (self.retroactive is None or item.retroactive == self.retroactive)
        )


class RoutingError(ValueError):
    """The queues and routes do not fit together; the message says which."""


@dataclass(frozen=True)
class Routing:
    queues: dict[str, QueueSpec]
    routes: tuple[RouteSpec, ...]
    default: str

    @classmethod
    def build(cls, queues: Sequence[QueueSpec], routes: Sequence[RouteSpec], default: str = "default") -> Routing:
        named = {q.name: q for q in queues}
        if len(named) != len(queues):
            raise RoutingError("MODERATOR_CONSOLE_QUEUES names a queue twice")
        named.setdefault(default, QueueSpec(name=default))
        named.setdefault(APPEALS, QueueSpec(name=APPEALS, roles=("lead", "admin")))
        unknown = sorted({r.queue for r in routes} - set(named))
        if unknown:
            raise RoutingError(f"MODERATOR_CONSOLE_ROUTES sends items to {unknown}, not in MODERATOR_CONSOLE_QUEUES")
        return cls(named, tuple(routes), default)

    def queue_of(self, item: ReviewItem) -> str:
        if item.appeal_id is not None:  # appeals: only a rule that asks for them, else their own queue
            return next((r.queue for r in self.routes if r.appeal and r.matches(item)), APPEALS)
        return next((r.queue for r in self.routes if r.matches(item)), self.default)

    def may_work(self, queue: str, role: Role) -> bool:
        spec = self.queues.get(queue)
        return spec is not None and role in spec.roles

    def queues_for(self, role: Role) -> list[str]:
        return [name for name, spec in self.queues.items() if role in spec.roles]
