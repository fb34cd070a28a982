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

Every page but ``/login`` needs an authenticated reviewer (a session from the login form, or a header
set by a trusted authenticating proxy); every POST needs the session's CSRF token (``security.py``).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
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

from moderator import observability as obs
from moderator.console.auth import Accounts
from moderator.console.images import ImageUnavailable
from moderator.console.queue import ReviewQueue
from moderator.console.security import CSRFMiddleware, SecurityHeadersMiddleware, csrf_token, rotate_csrf_token
from moderator.console.service import ConsoleError, ReviewService
from moderator.events import VerdictKind

HERE = Path(__file__).parent
VERDICTS: tuple[VerdictKind, ...] = ("confirm", "overturn", "escalate")
Handler = Callable[[Request], Awaitable[Response]]

log = obs.get_logger(__name__)


@dataclass(frozen=True)
class WebConfig:
    secret_key: str
    accounts: Accounts | None
    trusted_user_header: str | None
    trusted_proxies: frozenset[str]
    https: bool
    allowed_origins: frozenset[str]
    session_s: int
    grid_size: int
    lease_s: float
    dev: bool  # development mode: shown on every page
    banks: tuple[str, ...] = ()  # known-image banks a confirmed image may be added to


def create_app(config: WebConfig, queue: ReviewQueue, service: ReviewService) -> Starlette:
    templates = Jinja2Templates(directory=HERE / "templates")

    def reviewer(request: Request) -> str | None:
        header = config.trusted_user_header
        if header and request.client is not None and request.client.host in config.trusted_proxies:
            name = request.headers.get(header)
            if name:
                return name
        user = request.session.get("user")
        return str(user) if user else None

    def page(request: Request, name: str, status: int = 200, **context: Any) -> Response:
        depth = queue.depth()
        context.update(user=reviewer(request), csrf=csrf_token(request.session), dev=config.dev,
                       pending=depth["new"] + depth["second"], escalated=depth["escalated"],
                       set_aside=depth["set_aside"], lease_s=int(config.lease_s))  # fmt: skip
        return templates.TemplateResponse(request, name, context, status_code=status)

    def signed_in(handler: Callable[[Request, str], Awaitable[Response]]) -> Handler:
        async def wrapped(request: Request) -> Response:
            user = reviewer(request)
            if user is None:
                if request.url.path.startswith("/api/"):
                    return JSONResponse({"error": "not signed in"}, status_code=401)
                return RedirectResponse("/login", status_code=303)
            try:
                return await handler(request, user)
            except ConsoleError as exc:
                if request.url.path.startswith("/api/"):
                    return JSONResponse({"error": str(exc)}, status_code=exc.status)
                return page(request, "error.html", status=exc.status, message=str(exc))

        return wrapped

    async def next_item(user: str, escalated: bool = False) -> Response:
        got = await run_in_threadpool(service.claim_next, user, 1, escalated)
        if not got:
            return RedirectResponse("/?empty=1", status_code=303)
        return RedirectResponse(f"/item/{got[0].handle}", status_code=303)

    # --- signing in --------------------------------------------------------------------------------
    async def login_page(request: Request) -> Response:
        if reviewer(request) is not None:
            return RedirectResponse("/", status_code=303)
        return page(request, "login.html")

    async def login(request: Request) -> Response:
        form = await request.form()
        name, password = str(form.get("username", "")), str(form.get("password", ""))
        ok = config.accounts is not None and await run_in_threadpool(config.accounts.check, name, password)
        if not ok:
            log.info("console_login_failed", username=name[:64])
            return page(request, "login.html", status=401, error="Wrong name or password.")
        request.session.clear()  # a new session on signing in
        request.session["user"] = name
        rotate_csrf_token(request.session)
        log.info("console_login", reviewer=name)
        return RedirectResponse("/", status_code=303)

    async def logout(request: Request) -> Response:
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # --- pages ---------------------------------------------------------------------------------------
    async def home(request: Request, user: str) -> Response:
        upcoming = queue.pending()[:25]
        recent = queue.judged_by(user, 20)
        return page(request, "queue.html", upcoming=upcoming, recent=recent, empty="empty" in request.query_params)

    async def escalated_page(request: Request, user: str) -> Response:
        items = queue.pending("escalated")[:100]
        return page(request, "escalated.html", items=items, verdicts={q.handle: queue.verdict(q.handle)
                                                                       for q in items})  # fmt: skip

    async def item_page(request: Request, user: str) -> Response:
        handle = request.path_params["handle"]
        queued = await run_in_threadpool(service.held, handle, user)
        refused = None
        try:  # the image is checked (and cached) before the page says anything about it
            await run_in_threadpool(service.image, handle, user)
        except ImageUnavailable as exc:  # ImageChanged too: never the other bytes, a refusal
            refused = str(exc)
        second = service.second_opinion(handle, user)
        current = queue.second_opinion(handle) if second else queue.verdict(handle)
        return page(request, "item.html", q=queued, item=queued.item, current=current, second=second,
                    refused=refused, verdict_names=VERDICTS, banks=config.banks)  # fmt: skip

    async def grid_page(request: Request, user: str) -> Response:
        return page(request, "grid.html", items=await run_in_threadpool(service.mine, user))

    async def image(request: Request, user: str) -> Response:
        try:
            data = await run_in_threadpool(service.image, request.path_params["handle"], user)
        except ImageUnavailable as exc:
            raise ConsoleError(str(exc)) from None
        return Response(data, media_type="image/jpeg")

    # --- actions -------------------------------------------------------------------------------------
    async def claim(request: Request, user: str) -> Response:
        return await next_item(user, escalated=request.query_params.get("escalated") == "1")

    async def claim_one(request: Request, user: str) -> Response:
        queued = await run_in_threadpool(service.claim, request.path_params["handle"], user)
        return RedirectResponse(f"/item/{queued.handle}", status_code=303)

    async def verdict(request: Request, user: str) -> Response:
        form = await request.form()
        choice = str(form.get("verdict", ""))
        if choice not in VERDICTS:
            raise ConsoleError(f"a verdict is one of {', '.join(VERDICTS)}")
        categories = [str(c) for c in form.getlist("category")]
        bank = (str(form.get("bank", "")) or None) if choice == "confirm" else None
        await run_in_threadpool(service.submit, request.path_params["handle"], user, choice, categories,
                                str(form.get("note", "")), bank)  # fmt: skip
        return await next_item(user)

    async def skip(request: Request, user: str) -> Response:
        await run_in_threadpool(service.skip, request.path_params["handle"], user)
        return await next_item(user)

    async def grid_claim(request: Request, user: str) -> Response:
        mine = await run_in_threadpool(service.mine, user)
        wanted = max(0, config.grid_size - len(mine))
        if wanted:
            held = frozenset(q.handle for q in mine)
            await run_in_threadpool(service.claim_next, user, wanted, False, held)
        return RedirectResponse("/grid", status_code=303)

    async def api_verdict(request: Request, user: str) -> Response:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            raise ConsoleError("expected a JSON body") from None
        choice = body.get("verdict")
        if choice not in VERDICTS or not isinstance(body.get("handle"), str):
            raise ConsoleError(f"expected {{handle, verdict: {'|'.join(VERDICTS)}, categories, note}}")
        categories = [str(c) for c in body.get("categories") or []]
        done = await run_in_threadpool(service.submit, body["handle"], user, choice, categories,
                                       str(body.get("note") or ""))  # fmt: skip
        return JSONResponse({"ok": True, "published": done.published, "revision": done.verdict.revision})

    async def api_revealed(request: Request, user: str) -> Response:
        body = await request.json()
        await run_in_threadpool(service.held, str(body.get("handle")), user)  # only what they hold
        obs.CONSOLE_REVEALS.labels(reviewer=user).inc()
        return JSONResponse({"ok": True})

    routes = [
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/", signed_in(home)),
        Route("/escalated", signed_in(escalated_page)),
        Route("/grid", signed_in(grid_page)),
        Route("/item/{handle}/verdict", signed_in(verdict), methods=["POST"]),
        Route("/item/{handle}/skip", signed_in(skip), methods=["POST"]),
        Route("/item/{handle}", signed_in(item_page)),
        Route("/image/{handle}", signed_in(image)),
        Route("/claim", signed_in(claim), methods=["POST"]),
        Route("/claim/{handle}", signed_in(claim_one), methods=["POST"]),
        Route("/grid/claim", signed_in(grid_claim), methods=["POST"]),
        Route("/api/verdict", signed_in(api_verdict), methods=["POST"]),
        Route("/api/revealed", signed_in(api_revealed), methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    middleware = [
        Middleware(SecurityHeadersMiddleware, hsts=config.https),
        Middleware(
            SessionMiddleware,
            secret_key=config.secret_key,
            session_cookie="moderator_console",
            max_age=config.session_s,
            same_site="strict",
            https_only=config.https,
        ),
        Middleware(CSRFMiddleware, allowed_origins=config.allowed_origins),
    ]
    return Starlette(routes=routes, middleware=middleware)
