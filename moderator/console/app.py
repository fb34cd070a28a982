"""The console's web application (Starlette, server-side Jinja2 templates, one static script).

Pages: ``/login``; ``/`` (the queue: counts, what is next, the reviewer's recent verdicts);
``/item/{handle}`` (one claimed item: the image blurred and grayscale until revealed, its scores against
the thresholds, the rules that fired, the closest texts, metadata, versions; verdict buttons, all on the
keyboard); ``/grid`` (a batch of claimed items for fast triage); ``/escalated``. An item is named in
URLs by its handle (hex: its event id and image sha256, hashed), never by the event id, which may hold
any printable character.
State changes are POSTs: ``/claim``, ``/claim/{handle}``, ``/item/{handle}/verdict``,
``/item/{handle}/skip``, ``/grid/claim``, ``/logout``; and JSON for the grid's script: ``/api/verdict``,
``/api/revealed``.

Every page but ``/login`` needs an authenticated reviewer (a server-side session from the login form,
``sessions.py``, or a header set by a trusted authenticating proxy, ``auth.py``); every POST needs the
session's CSRF token, every request an allowed ``Host`` (``security.py``). Roles: a lead finalizes
escalations, changes others' verdicts and adds to banks; an admin also sees ``/admin`` (who holds what).
Images are served blurred (``/image/{handle}``) until the reviewer reveals them
(``/image/{handle}/original`` after ``/api/revealed``).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp

from moderator import observability as obs
from moderator.console.auth import (
    USERNAME_RE,
    AccountsFile,
    Network,
    header_once,
    peer_trusted,
    role_of_groups,
)
from moderator.console.images import ImageUnavailable
from moderator.console.queue import ReviewQueue
from moderator.console.security import (
    CSRFMiddleware,
    HostCheckMiddleware,
    SecurityHeadersMiddleware,
    csrf_token,
    rotate_csrf_token,
)
from moderator.console.service import ConsoleError, Forbidden, Person, ReviewService
from moderator.console.sessions import LoginGuard, Sessions
from moderator.console.team import duration, team_stats
from moderator.events import VerdictKind

HERE = Path(__file__).parent
VERDICTS: tuple[VerdictKind, ...] = ("confirm", "overturn", "escalate")
Handler = Callable[[Request], Awaitable[Response]]
LOGIN_WAITING = 16  # sign-ins waiting for the password hash pool at most; more get 503 at once

log = obs.get_logger(__name__)


@dataclass(frozen=True)
class WebConfig:
    secret_key: str
    accounts: AccountsFile | None
    trusted_user_header: str | None
    trusted_proxies: tuple[Network, ...]
    https: bool
    allowed_origins: frozenset[str]
    allowed_hosts: frozenset[str]
    grid_size: int
    lease_s: float
    dev: bool  # development mode: shown on every page
    banks: tuple[str, ...] = ()  # known-image banks a confirmed image may be added to
    trusted_groups_header: str | None = None
    lead_groups: tuple[str, ...] = ()
    admin_groups: tuple[str, ...] = ()
    login_free_attempts: int = 5


def create_app(config: WebConfig, queue: ReviewQueue, service: ReviewService, sessions: Sessions) -> ASGIApp:
    templates = Jinja2Templates(directory=HERE / "templates")
    by_account = LoginGuard(sessions.client, sessions.prefix, free=config.login_free_attempts)
    by_address = LoginGuard(sessions.client, sessions.prefix, free=config.login_free_attempts * 4)
    hashing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="console-login")  # scrypt: one core at most
    waiting = threading.BoundedSemaphore(LOGIN_WAITING)

    def peer(request: Request) -> str | None:
        return request.client.host if request.client is not None else None

    def from_proxy(request: Request) -> Person | None:
        header = config.trusted_user_header
        if not header or not peer_trusted(peer(request), config.trusted_proxies):
            return None
        name = header_once(request.headers.getlist(header))
        if name is None or not USERNAME_RE.match(name):
            return None
        groups = config.trusted_groups_header
        role = "reviewer"
        if groups:
            role = role_of_groups(header_once(request.headers.getlist(groups)) or "", config.lead_groups,
                                  config.admin_groups)  # fmt: skip
        return Person(name, role)  # type: ignore[arg-type]

    def identify(request: Request) -> Person | None:
        """The authenticated reviewer: the trusted proxy's header, else a live session of a current account."""
        who = from_proxy(request)
        if who is not None:
            return who
        sid = request.session.get("sid")
        name = sessions.user(sid) if sid else None
        if name is None:
            return None
        role = config.accounts.current().role(name) if config.accounts is not None else None
        if role is None:  # the account left the accounts file: every session of it ends now
            sessions.end_all(name)
            request.session.clear()
            log.info("console_session_revoked", reviewer=name, why="no longer in the accounts file")
            return None
        return Person(name, role)

    def address(request: Request) -> str:
        """The client's address for the login guard: behind a trusted proxy, the one it forwarded."""
        client = peer(request) or "?"
        if peer_trusted(client, config.trusted_proxies):
            forwarded = request.headers.get("x-forwarded-for", "")
            if forwarded:
                return forwarded.rsplit(",", 1)[-1].strip() or client
        return client

    def page(request: Request, name: str, who: Person | None, status: int = 200, headers_retry: str | None = None,
             **context: Any) -> Response:  # fmt: skip
        depth = queue.depth()
        context.update(user=who.name if who else None, role=who.role if who else None,
                       csrf=csrf_token(request.session), dev=config.dev,
                       pending=depth["new"] + depth["second"], escalated=depth["escalated"],
                       set_aside=depth["set_aside"], lease_s=int(config.lease_s))  # fmt: skip
        response = templates.TemplateResponse(request, name, context, status_code=status)
        if headers_retry is not None:
            response.headers["Retry-After"] = headers_retry
        return response

    def signed_in(handler: Callable[[Request, Person], Awaitable[Response]]) -> Handler:
        async def wrapped(request: Request) -> Response:
            who = await run_in_threadpool(identify, request)
            if who is None:
                if request.url.path.startswith("/api/"):
                    return JSONResponse({"error": "not signed in"}, status_code=401)
                return RedirectResponse("/login", status_code=303)
            try:
                return await handler(request, who)
            except ConsoleError as exc:
                if request.url.path.startswith("/api/"):
                    return JSONResponse({"error": str(exc)}, status_code=exc.status)
                return page(request, "error.html", who, status=exc.status, message=str(exc))

        return wrapped

    async def next_item(who: Person, escalated: bool = False, named: str | None = None) -> Response:
        got = await run_in_threadpool(service.claim_next, who, 1, escalated, frozenset(), named)
        if not got:
            return RedirectResponse("/?empty=1", status_code=303)
        return RedirectResponse(f"/item/{got[0].handle}", status_code=303)

    # --- signing in --------------------------------------------------------------------------------
    async def login_page(request: Request) -> Response:
        if await run_in_threadpool(identify, request) is not None:
            return RedirectResponse("/", status_code=303)
        return page(request, "login.html", None)

    async def login(request: Request) -> Response:
        form = await request.form()
        name, password = str(form.get("username", ""))[:64], str(form.get("password", ""))[:1024]
        keys_account, keys_address = [f"account:{name}"], [f"ip:{address(request)}"]
        wait = await run_in_threadpool(lambda: max(by_account.wait(keys_account), by_address.wait(keys_address)))
        if wait > 0:  # no hash is computed while a wait runs
            obs.CONSOLE_LOGIN_REFUSED.labels(why="backoff").inc()
            retry = str(max(1, round(wait)))
            return page(request, "login.html", None, status=429, headers_retry=retry,
                        error=f"Too many failed sign-ins: try again in {retry} s.")  # fmt: skip
        if config.accounts is None:
            return page(request, "login.html", None, status=401, error="Sign-in is through your company's proxy.")
        if not waiting.acquire(blocking=False):
            obs.CONSOLE_LOGIN_REFUSED.labels(why="busy").inc()
            return page(request, "login.html", None, status=503, headers_retry="1",
                        error="Too many sign-ins at once: try again in a moment.")  # fmt: skip
        try:
            accounts = config.accounts.current()
            account = await asyncio.get_running_loop().run_in_executor(hashing, accounts.check, name, password)
        finally:
            waiting.release()
        if account is None:
            await run_in_threadpool(by_account.failed, keys_account)
            await run_in_threadpool(by_address.failed, keys_address)
            log.info("console_login_failed", username=name, address=address(request))
            return page(request, "login.html", None, status=401, error="Wrong name or password.")
        await run_in_threadpool(by_account.succeeded, keys_account)
        sessions.end(request.session.get("sid"))
        request.session.clear()  # a new session on signing in
        request.session["sid"] = await run_in_threadpool(sessions.create, account.name)
        rotate_csrf_token(request.session)
        log.info("console_login", reviewer=account.name, role=account.role)
        return RedirectResponse("/", status_code=303)

    async def logout(request: Request) -> Response:
        await run_in_threadpool(sessions.end, request.session.get("sid"))
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # --- pages ---------------------------------------------------------------------------------------
    async def home(request: Request, who: Person) -> Response:
        mine = service.routing.queues_for(who.role)
        upcoming = queue.pending(queues=mine)[:25]
        recent = queue.judged_by(who.name, 20)
        depth = queue.depth_by_queue()
        named = [(name, depth.get(name, 0)) for name in mine] if len(mine) > 1 else []
        return page(request, "queue.html", who, upcoming=upcoming, recent=recent, queues=named,
                    empty="empty" in request.query_params)  # fmt: skip

    async def escalated_page(request: Request, who: Person) -> Response:
        items = queue.pending("escalated")[:100]
        return page(request, "escalated.html", who, items=items, verdicts={q.handle: queue.verdict(q.handle)
                                                                            for q in items})  # fmt: skip

    async def item_page(request: Request, who: Person) -> Response:
        handle = request.path_params["handle"]
        queued = await run_in_threadpool(service.held, handle, who.name)
        refused = None
        try:  # the image is checked (and cached) before the page says anything about it
            await run_in_threadpool(service.image, handle, who.name)
        except ImageUnavailable as exc:  # ImageChanged too: never the other bytes, a refusal
            refused = str(exc)
        second = service.second_opinion(handle, who.name)
        current = queue.second_opinion(handle) if second else queue.verdict(handle)
        return page(request, "item.html", who, q=queued, item=queued.item, current=current, second=second,
                    refused=refused, verdict_names=VERDICTS, banks=config.banks if who.lead else (),
                    final_allowed=who.lead or queue.stage(handle) != "escalated")  # fmt: skip

    async def grid_page(request: Request, who: Person) -> Response:
        return page(request, "grid.html", who, items=await run_in_threadpool(service.mine, who.name))

    async def admin_page(request: Request, who: Person) -> Response:
        if who.role != "admin":
            raise Forbidden("the admin's page")
        holds = []
        for handle, holder, left in await run_in_threadpool(service.leases.all):
            queued = queue.get(handle)
            holds.append((holder, queued.item.event_id if queued else "(not in this replica's queue)", left))
        return page(request, "admin.html", who, holds=sorted(holds), depth=queue.depth())

    async def team_page(request: Request, who: Person) -> Response:
        if not who.lead:
            raise Forbidden("the lead's page")
        stats = await run_in_threadpool(lambda: team_stats(queue.waiting(), queue.history(), time.time()))
        return page(request, "team.html", who, stats=stats, duration=duration)

    async def image(request: Request, who: Person) -> Response:
        original = request.path_params.get("view") == "original"
        if request.path_params.get("view") not in (None, "original"):
            raise ConsoleError("no such image view")
        try:
            data = await run_in_threadpool(service.image, request.path_params["handle"], who.name, original)
        except ImageUnavailable as exc:
            raise ConsoleError(str(exc)) from None
        return Response(data, media_type="image/jpeg")

    # --- actions -------------------------------------------------------------------------------------
    async def claim(request: Request, who: Person) -> Response:
        named = request.query_params.get("queue") or None
        return await next_item(who, escalated=request.query_params.get("escalated") == "1", named=named)

    async def claim_one(request: Request, who: Person) -> Response:
        queued = await run_in_threadpool(service.claim, request.path_params["handle"], who)
        return RedirectResponse(f"/item/{queued.handle}", status_code=303)

    async def verdict(request: Request, who: Person) -> Response:
        form = await request.form()
        choice = str(form.get("verdict", ""))
        if choice not in VERDICTS:
            raise ConsoleError(f"a verdict is one of {', '.join(VERDICTS)}")
        categories = [str(c) for c in form.getlist("category")]
        bank = (str(form.get("bank", "")) or None) if choice == "confirm" else None
        assign = (str(form.get("assign", "")).strip() or None) if choice == "escalate" else None
        await run_in_threadpool(service.submit, request.path_params["handle"], who, choice, categories,
                                str(form.get("note", "")), bank, assign)  # fmt: skip
        return await next_item(who)

    async def skip(request: Request, who: Person) -> Response:
        await run_in_threadpool(service.skip, request.path_params["handle"], who.name)
        return await next_item(who)

    async def grid_claim(request: Request, who: Person) -> Response:
        mine = await run_in_threadpool(service.mine, who.name)
        wanted = max(0, config.grid_size - len(mine))
        if wanted:
            held = frozenset(q.handle for q in mine)
            await run_in_threadpool(service.claim_next, who, wanted, False, held)
        return RedirectResponse("/grid", status_code=303)

    async def api_verdict(request: Request, who: Person) -> Response:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            raise ConsoleError("expected a JSON body") from None
        choice = body.get("verdict") if isinstance(body, dict) else None
        if choice not in VERDICTS or not isinstance(body.get("handle"), str):
            raise ConsoleError(f"expected {{handle, verdict: {'|'.join(VERDICTS)}, categories, note}}")
        categories = [str(c) for c in body.get("categories") or []]
        done = await run_in_threadpool(service.submit, body["handle"], who, choice, categories,
                                       str(body.get("note") or ""))  # fmt: skip
        return JSONResponse({"ok": True, "published": done.published, "revision": done.verdict.revision})

    async def api_revealed(request: Request, who: Person) -> Response:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            raise ConsoleError("expected a JSON body") from None
        handle = str(body.get("handle")) if isinstance(body, dict) else ""
        await run_in_threadpool(service.reveal, handle, who.name)  # only what they hold
        return JSONResponse({"ok": True, "original": f"/image/{handle}/original"})

    routes = [
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/", signed_in(home)),
        Route("/escalated", signed_in(escalated_page)),
        Route("/grid", signed_in(grid_page)),
        Route("/admin", signed_in(admin_page)),
        Route("/team", signed_in(team_page)),
        Route("/item/{handle}/verdict", signed_in(verdict), methods=["POST"]),
        Route("/item/{handle}/skip", signed_in(skip), methods=["POST"]),
        Route("/item/{handle}", signed_in(item_page)),
        Route("/image/{handle}", signed_in(image)),
        Route("/image/{handle}/{view}", signed_in(image)),
        Route("/claim", signed_in(claim), methods=["POST"]),
        Route("/claim/{handle}", signed_in(claim_one), methods=["POST"]),
        Route("/grid/claim", signed_in(grid_claim), methods=["POST"]),
        Route("/api/verdict", signed_in(api_verdict), methods=["POST"]),
        Route("/api/revealed", signed_in(api_revealed), methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    middleware = [
        Middleware(
            SessionMiddleware,
            secret_key=config.secret_key,
            session_cookie="__Host-moderator_console" if config.https else "moderator_console",
            max_age=None,  # a browser-session cookie; the session's life is in Redis (sessions.py)
            same_site="strict",
            https_only=config.https,
        ),
        Middleware(CSRFMiddleware, allowed_origins=config.allowed_origins),
    ]
    inner = Starlette(routes=routes, middleware=middleware)
    # Outermost, around Starlette's own error handling: every response (a 500, a refused Host) gets
    # the security headers.
    return SecurityHeadersMiddleware(HostCheckMiddleware(inner, config.allowed_hosts), hsts=config.https)
