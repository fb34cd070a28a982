"""``moderator console``: reviewers decide in a browser; their verdicts flow back on Kafka.

Every console replica reads the whole review topic and keeps the queue in memory (``queue.py``),
hands items out under expiring Redis leases (``leases.py``), serves the pages (``app.py``,
``templates/``, ``static/``) and the images itself (``images.py``), and publishes each verdict to the
verdicts topic (``feeds.py``). What a reviewer can do is in ``service.py``; accounts, roles and the
login guard in ``auth.py``, sessions in ``sessions.py``, request security in ``security.py``, the
lead's figures in ``team.py``.

Authentication is required: reviewer accounts in a file (``MODERATOR_CONSOLE_ACCOUNTS_FILE``), and/or a
header set by an authenticating proxy (``MODERATOR_CONSOLE_TRUSTED_USER_HEADER``, trusted only from
``MODERATOR_CONSOLE_TRUSTED_PROXIES``). Without either it refuses to start, unless started with
``--dev``, which makes a throwaway account and says so on every page.
"""

from __future__ import annotations

import secrets
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from moderator import clients
from moderator.app import App
from moderator.console.app import WebConfig, create_app
from moderator.console.auth import AccountsFile, hash_password, parse_networks
from moderator.console.banks import ConsoleBanks
from moderator.console.feeds import ConsoleFeeds
from moderator.console.images import ReviewImages
from moderator.console.leases import Leases
from moderator.console.queue import ReviewQueue
from moderator.console.routing import QueueSpec, RouteSpec, Routing, RoutingError
from moderator.console.security import host_name
from moderator.console.service import ReviewService
from moderator.console.sessions import Sessions
from moderator.observability import HealthServer, get_logger
from moderator.web_server import WebServer

log = get_logger(__name__)


def redis_ready(client: Any) -> bool:
    """Readiness: Redis answers (leases, sessions and claims live there)."""
    try:
        return bool(client.ping())
    except Exception:
        return False


class ConsoleConfigError(Exception):
    """The console cannot start as configured; the message says what to set."""


def _accounts_error(message: str) -> None:
    log.error("console_accounts_unreadable", error=message, consequence="the last good accounts stay in use")


def dev_account(directory: Path) -> tuple[Path, str, str]:
    """A throwaway reviewer account for development: (accounts file, name, password)."""
    password = secrets.token_urlsafe(12)
    path = directory / "dev-reviewers.txt"
    path.write_text(f"dev:admin:{hash_password(password, ln=12)}\n")
    return path, "dev", password


class Console:
    """The whole console, started and stopped as one (``moderator console``, the demo, the tests)."""

    def __init__(self, app: App, *, dev: bool = False, health: bool = True) -> None:
        s = app.settings
        self.app = app
        self.dev = dev
        self.dev_login: tuple[str, str] | None = None
        accounts_file = s.console_accounts_file
        if accounts_file is None and dev:
            self._tmp = tempfile.TemporaryDirectory(prefix="moderator-console-")
            accounts_file, name, password = dev_account(Path(self._tmp.name))
            self.dev_login = (name, password)
        if accounts_file is None and s.console_trusted_user_header is None:
            raise ConsoleConfigError(
                "the console needs to know who its reviewers are: set MODERATOR_CONSOLE_ACCOUNTS_FILE (lines made"
                " by `moderator console add-user NAME`) and/or MODERATOR_CONSOLE_TRUSTED_USER_HEADER (a header"
                " your authenticating proxy sets); or start it with --dev to try it with a throwaway account"
            )
        accounts = AccountsFile(accounts_file, on_error=_accounts_error) if accounts_file is not None else None
        secret = s.console_secret_key.get_secret_value() if s.console_secret_key else None
        if secret is None:
            secret = secrets.token_hex(32)
            if not dev:
                log.warning("console_secret_key_generated", consequence="sessions end when the console restarts",
                            fix="set MODERATOR_CONSOLE_SECRET_KEY (the same on every replica)")  # fmt: skip
        redis = clients.make_redis(s.redis_url.get_secret_value(), 2000, 2000)
        self.redis = redis
        try:
            queues = [QueueSpec.model_validate(q) for q in s.console_queues]
            routing = Routing.build(queues, [RouteSpec.model_validate(r) for r in s.console_routes],
                                    s.console_default_queue)  # fmt: skip
        except (ValidationError, RoutingError) as exc:
            raise ConsoleConfigError(f"MODERATOR_CONSOLE_QUEUES / _ROUTES: {exc}") from None
        self.queue = ReviewQueue(route=routing.queue_of)
        self.leases = Leases(redis, s.console_redis_prefix, s.console_lease_s)
        self.sessions = Sessions(redis, s.console_redis_prefix, s.console_idle_minutes * 60,
                                 s.console_session_hours * 3600)  # fmt: skip
        self.feeds = ConsoleFeeds(app, self.queue)
        self.images = ReviewImages(app)
        banks = ConsoleBanks(app, self.images, self.feeds) if s.console_banks else None
        self.service = ReviewService(self.queue, self.leases, self.feeds, self.images, banks=banks,
                                     max_leases=s.console_max_leases, routing=routing)  # fmt: skip
        self.feeds.on_tick = self.service.expire_claims
        hosts = set(s.console_allowed_hosts) | {host_name(urlsplit(o).netloc) for o in s.console_allowed_origins}
        if s.console_host not in ("0.0.0.0", "::", ""):
            hosts.add(s.console_host)
        self.web = create_app(
            WebConfig(
                secret_key=secret, accounts=accounts, trusted_user_header=s.console_trusted_user_header,
                trusted_proxies=parse_networks(s.console_trusted_proxies), https=s.console_https,
                allowed_origins=frozenset(s.console_allowed_origins), allowed_hosts=frozenset(hosts),
                grid_size=min(s.console_grid_size, s.console_max_leases), lease_s=s.console_lease_s, dev=dev,
                banks=tuple(s.console_banks), trusted_groups_header=s.console_trusted_groups_header,
                lead_groups=tuple(s.console_lead_groups), admin_groups=tuple(s.console_admin_groups),
                login_free_attempts=s.console_login_free_attempts,
            ),
            self.queue, self.service, self.sessions,
        )  # fmt: skip
        self.health = HealthServer(s.http_host, s.http_port) if health else None
        self.web_server = WebServer(self.web, s.console_host, s.console_port, name="console")

    @property
    def url(self) -> str:
        return self.web_server.url

    def start(self) -> Console:
        """Load every verdict, start following the topics, and serve (on a thread)."""
        self.feeds.start()
        if self.health is not None:
            self.health.add_check("verdicts_loaded", self.feeds.loaded.is_set)
            self.health.add_check("redis", self._redis_ok)
            self.health.start()
        self.web_server.start()
        log.info("console_started", url=self.url, dev=self.dev, group=self.app.settings.console_group_id)
        return self

    def _redis_ok(self) -> bool:
        return redis_ready(self.redis)

    def wait(self) -> None:
        self.web_server.wait()

    def stop(self) -> None:
        """Stop serving and close every client (also for a console that was never started)."""
        started = self.web_server.started
        self.web_server.stop()
        self.feeds.stop()
        self.images.close()
        if self.health is not None and started:
            self.health.stop()
