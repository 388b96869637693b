"""Reverse proxy to llama-server, as a plain ASGI app: this is the hot path, so it stays small.

Requests wait (bounded) while the child (re)starts; a request refused or reset before any response
byte is retried once after recovery; streams pass through chunk by chunk; a client that goes away
closes the upstream request so llama-server stops generating.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from ...child.progress import Exchange
from ...core import quarantine
from ...media import policy as media
from ...media.images import ImageError, Stats, rewrite_chat
from ...media.workers import ImageWorkers
from ...models.model import Model
from ...models.pool import Unavailable
from ...telemetry.activity_record import Record
from ..errors import Receive, Scope, Send, json_error, send_simple
from ..guard.context import ContextGuard, ContextRejected, CountError
from ..guard.poison import PoisonGuard
from ..guard.validate import BIG_BODY, Rejected, parse_json, serialise
from . import routes
from .carry import Carry, ChildUpstream
from .gate import Gate, upstream_limit
from .predict import predict_to_chat
from .relay import HOP_BY_HOP, ctx_words, relay
from .routes import PREDICT, Route
from .upstream import Retryable, UpstreamError, UpstreamPool

log = structlog.get_logger("proxy")
# Waits for the model to be loaded and its child ready; returns the call that ends the admission.
Admit = Callable[[], Awaitable[Callable[[], None]]]

KEEPALIVE_IDLE = 4  # within llama-server's "+4" spare HTTP threads
TRIMMED_HEADER = b"x-context-trimmed"  # what the context guard left out: images=N; turns=N; messages=N; tokens=N


class _Departure:
    """Cancels the request's own task when its client goes away (uvicorn's `receive` says so), until `stop()`.
    One watching task per request; the request itself runs in the task uvicorn made for it (a task of its own
    and asyncio.wait over the two cost more than the rest of the proxy's own work on a short request)."""

    def __init__(self, receive: Receive) -> None:
        self.left = False
        self._stopped = False
        self._task = asyncio.current_task()
        self._watch = asyncio.get_running_loop().create_task(self._run(receive))

    async def _run(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not self._stopped and self._task is not None:
            self.left = True
            self._task.cancel()

    def stop(self) -> None:
        self._stopped = True
        self._watch.cancel()


def _printable(query: bytes) -> bytes:
    """HTTP/1.1 allows only printable ASCII in a request target: other bytes go percent-encoded (same meaning)."""
    if all(0x21 <= b <= 0x7E for b in query):
        return query
    return b"".join(bytes([b]) if 0x21 <= b <= 0x7E else b"%%%02X" % b for b in query)


class Proxy:
    """One model's way to llama-server, made with the model and kept for its whole life in the catalog: its
    upstream gate, quarantine, learned context costs and connections survive unloads, loads and restarts."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.runner = runner = model.runner
        self.metrics = model.metrics
        self.remote_hosts = frozenset(h.lower() for h in runner.cfg.remote_image_hosts)
        cfg = runner.cfg
        self.images = ImageWorkers(cfg.image_workers, cfg.image_queue_wait_s, cfg.image_queue_max)
        self.gate = Gate(upstream_limit(runner.cfg, runner.loaded.profile), self.metrics)
        self.poison = PoisonGuard(self.metrics, quarantine.Policy(window_s=runner.cfg.quarantine_window_s,
                                                                  duration_s=runner.cfg.quarantine_s))
        runner.on_exit(self.poison.on_exit)
        # Our own HTTP/1.1 client (upstream.py: httptools' parser), not httpx or httpcore: on this hot path they
        # cost most of the proxy's CPU per request and per streamed token.
        # Keep few idle connections, and not for long: every idle keep-alive connection pins one of
        # llama-server's fixed HTTP threads (parallel + 4 of them) until its 5 s keep-alive timeout, and a
        # new connection that finds them all pinned waits for that timeout (measured: 5 s stalls).
        self.upstream = UpstreamPool(max_idle=KEEPALIVE_IDLE, idle_s=4.0)
        self.context = ContextGuard(runner, self.upstream)
        runner.on_warmed(self.context.after_warmup)

    async def aclose(self) -> None:
        self.images.close()
        await self.upstream.aclose()

    async def serve(self, scope: Scope, receive: Receive, send: Send, route: Route, raw_path: bytes, body: bytes,
                    admit: Admit, deadline: float, rec: Record | None = None) -> None:
        """Forward one request whose route was allowed and whose body was read: `admit` waits (until `deadline`)
        for the model to be loaded and ready and returns its release; the client leaving cancels everything.
        `rec`, the request's activity record, is finished here."""
        label = route.label
        t0 = time.perf_counter()
        status = [499]  # what the client got; stays 499 if it left first
        leave = _Departure(receive)
        try:
            try:
                await self._forward(scope, raw_path, route, body, send, status, admit, deadline, rec)
            finally:
                leave.stop()
        except asyncio.CancelledError:
            if not leave.left:
                raise  # not the client leaving: a shutdown (web/errors.py JsonGuard answers it)
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        except Exception as exc:
            log.error("proxy_error", path=scope["path"], error=repr(exc), exc_info=exc)
            if status[0] == 499 and not leave.left:  # nothing was sent yet: the client still gets an answer
                await _fail(send, status, rec, 500, f"supervisor error: {type(exc).__name__}", "server_error")
        finally:
            self.metrics.requests.labels(label, str(status[0])).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - t0)
        if rec is not None:
            rec.status = status[0]
            rec.finish()

    async def _check_body(self, route: Route, body: bytes, rec: Record | None) -> tuple[bytes, Chat | None]:
        """Parse once, decide on the parsed request, forward what was decided on: shape errors are 400s that name
        the field; every media slot goes through the media policy; /predict becomes a chat completion.

        A big body (images, usually) is parsed on the image workers too: bodies waiting for a turn stay bytes,
        and only `image_workers` of them are expanded into documents and pixels at a time.
        Returns the body to send and, for the context guard, the chat request (document and image sizes)."""
        if not body:
            raise Rejected(400, f"{route.label}: expected a JSON object body")
        if len(body) > BIG_BODY:
            new, sent, stats = await self.images.run(self._decide, route, body)
        else:
            sent, found, changed = self._parse(route, body)
            if found is not None and found.images:
                media.check_urls(found, self.remote_hosts)  # cheap: refuse before queueing for image work
                new, stats = await self.images.run(self._apply, found, sent, changed)
            else:
                new, stats = self._apply(found, sent, changed)
        if stats.images:
            if rec is not None:
                rec.images_in, rec.images_downscaled = stats.images, stats.downscaled
            self.metrics.images.inc(stats.images)
            self.metrics.image_bytes.labels("in").inc(stats.bytes_in)
            self.metrics.image_bytes.labels("out").inc(stats.bytes_out)
        guard = sent is not None and route.chat and self.context.enabled(self.runner.loaded.profile)
        return (new if new is not None else body), (Chat(sent, stats.sizes) if guard and sent is not None else None)

    def _parse(self, route: Route, body: bytes) -> tuple[dict[str, Any] | None, media.Found | None, bool]:
        """(document, its media, changed by the context policy). The document is None for a route without media
        and the media None for a body that cannot hold any: both are forwarded as sent, once checked."""
        doc = parse_json(body)
        if not isinstance(doc, dict):
            raise Rejected(400, f"request body must be a JSON object, not {type(doc).__name__}")
        assert route.check is not None
        route.check(doc)
        if not route.media:
            return None, None, False
        changed = route is PREDICT
        if changed:
            doc = predict_to_chat(doc)
        profile = self.runner.loaded.profile
        policy = profile.images
        if route.chat and (policy.keep_last_turns or policy.keep_last_images is not None):
            changed = rewrite_chat(doc, policy)[0] is not None or changed
        if not media.possible(body):
            return doc, None, changed
        found = media.find(doc)
        if found.images and profile.mmproj is None:
            # llama-server would answer 500 ("image input is not supported"): it is the client's request.
            raise Rejected(400, f"profile '{profile.name}' has no vision projector (mmproj): "
                                "this model does not take images")
        return doc, found, changed

    def _apply(self, found: media.Found | None, doc: dict[str, Any] | None, changed: bool
               ) -> tuple[bytes | None, Stats]:
        """The media policy and serialisation (blocking with images: image workers). None: the body goes as sent."""
        if doc is None or ((found is None or not found.slots) and not changed):
            return None, Stats()
        stats = media.apply(found, self.runner.loaded.profile.images, self.remote_hosts,
                            self.runner.cfg.image_max_pixels) if found is not None else Stats()
        return serialise(doc), stats

    def _decide(self, route: Route, body: bytes) -> tuple[bytes | None, dict[str, Any] | None, Stats]:
        doc, found, changed = self._parse(route, body)
        new, stats = self._apply(found, doc, changed)
        return new, doc, stats

    def sync_profile(self) -> None:
        """The profile changed (reload): follow its parallel slots."""
        self.gate.set_limit(upstream_limit(self.runner.cfg, self.runner.loaded.profile))

    async def _settle(self, gen: int, within_s: float = 0.3) -> None:
        """After a refused or reset upstream request, give the runner a moment to notice a dead child (it
        usually does within milliseconds), so the retry waits for the next one instead of hitting a closed
        port. If the child stays up, the cause was a keep-alive connection it had just closed: retry then."""
        deadline = time.monotonic() + within_s
        while self.runner.ready and self.runner.machine.gen == gen and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    def _headers(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        out = []
        forwarded = None
        for k, v in scope["headers"]:
            if k in HOP_BY_HOP:
                continue
            if k == b"x-forwarded-for":
                forwarded = v
                continue
            out.append((k, v))
        client = scope.get("client")
        if client:
            ip = client[0].encode()
            out.append((b"x-forwarded-for", forwarded + b", " + ip if forwarded else ip))
        return out

    async def _forward(self, scope: Scope, raw_path: bytes, route: Route, body: bytes, send: Send,
                       status: list[int], admit: Admit, deadline: float, rec: Record | None) -> None:
        chat: Chat | None = None
        digest = await self.poison.digest(scope["method"], scope["path"], body)
        if (quarantined := self.poison.refusal(digest)) is not None:
            await _fail(send, status, rec, 422, quarantined, "invalid_request_error")
            return
        what = f"{scope['method']} {route.label} ({len(body)} bytes)"
        try:
            if scope["method"] == "POST" and route.check is not None:
                body, chat = await self._check_body(route, body, rec)
        except (Rejected, ImageError) as exc:
            kind = "unavailable_error" if exc.status == 503 else "invalid_request_error"
            await _fail(send, status, rec, exc.status, exc.message, kind,
                        exc.headers if isinstance(exc, Rejected) else None)
            return
        headers = self._headers(scope)
        query = scope.get("query_string", b"")
        # The raw bytes the client sent, as routes.py matched them: never the decoded path (%2F, %23, UTF-8).
        target = (b"/v1/chat/completions" if route is PREDICT else raw_path) + (b"?" + _printable(query) if query else b"")
        t_admit, loaded, state = time.perf_counter(), self.model.admitting, self.runner.machine.state.value
        try:
            release = await admit()  # the model loaded (a swap, if needed) and its child ready
        except Unavailable as exc:
            await _fail(send, status, rec, 503, str(exc), "unavailable_error", [(b"retry-after", b"5")])
            return
        finally:
            if rec is not None:
                self._admitted(rec, loaded, state, (time.perf_counter() - t_admit) * 1000)
        try:
            await self._send(scope, target, route, body, chat, digest, what, headers, send, status, deadline, rec)
        finally:
            release()

    def _admitted(self, rec: Record, loaded: bool, state: str, waited_ms: float) -> None:
        """The admission's wait on the record: a load (or swap) when the model was not in, else a restart."""
        if loaded:
            rec.queue_ms += waited_ms
            if waited_ms >= 1:
                rec.note(f"waited for llama-server ({state}): {waited_ms:.0f} ms")
        else:
            rec.load_ms = waited_ms
            rec.note(f"waited {waited_ms:.0f} ms for {self.model.id} to load")

    async def _send(self, scope: Scope, target: bytes, route: Route, body: bytes, chat: Chat | None, digest: str,
                    what: str, headers: list[tuple[bytes, bytes]], send: Send, status: list[int],
                    deadline: float, rec: Record | None) -> None:
        """Send to the child, once more if the first try never reached a live one (it died): the same deadline
        covers the wait for the next child and for a place at the upstream gate."""
        extra: list[tuple[bytes, bytes]] = []
        fitted_gen = -1
        attempt = 0
        while attempt < 2:
            t_wait, ready = time.perf_counter(), self.runner.ready
            ok, why = await self.model.wait_ready(deadline)
            if ok and not await self.gate.acquire(deadline - time.monotonic()):
                ok, why = False, (f"llama-server is busy: {self.gate.active} requests in progress, "
                                  f"{self.gate.waiting} waiting")
            if rec is not None:
                rec.queue_ms += (time.perf_counter() - t_wait) * 1000
                if not ready:
                    rec.note(f"waited for llama-server ({self.runner.machine.state.value})")
            if not ok:
                await _fail(send, status, rec, 503, why, "unavailable_error", [(b"retry-after", b"5")])
                return
            if not self.runner.ready:  # the child went while this request waited for a slot: wait for the next
                self.gate.release()
                continue
            attempt += 1
            gen = self.runner.machine.gen
            answered: bool | None = False
            sent = False
            try:
                if chat is not None and fitted_gen != gen:
                    fitted_gen = gen
                    try:
                        body, extra = await self._fit_context(chat, body, gen)
                    except Rejected as exc:
                        await _fail(send, status, rec, exc.status, exc.message, "invalid_request_error")
                        return
                    if rec is not None:
                        rec.context_trimmed = extra[0][1].decode() if extra else None
                self.poison.sent(gen, digest, what)
                sent = True
                ex = self.runner.progress.opened()
                onward = ChildUpstream(self.model, self.upstream, self.poison, self._settle, target, headers, digest, what, ex)
                carry = Carry.offer(route.label, body, onward, self.metrics, rec) if scope["method"] == "POST" else None
                answered = await self._exchange(scope["method"], target, body, headers, send, status, attempt,
                                                predict=route is PREDICT, extra=extra, rec=rec, carry=carry, ex=ex)
            finally:
                self.gate.release()
                if sent:
                    self.runner.progress.closed(ex)
                    self.poison.finished(gen, digest, bool(answered))
            if answered is not None:
                return
            if rec is not None:
                rec.note("llama-server went away before answering: sent again to the next one")
            await self._settle(gen)

    async def _exchange(self, method: str, target: bytes, body: bytes, headers: list[tuple[bytes, bytes]], send: Send,
                        status: list[int], attempt: int, predict: bool, extra: list[tuple[bytes, bytes]],
                        rec: Record | None = None, carry: Carry | None = None, ex: Exchange | None = None) -> bool | None:
        """One exchange with the child. Returns whether it answered in full, or None when the request never
        reached a live llama-server and may be sent again."""
        try:
            upstream = await self.upstream.send(self.runner.child_url, method, target, headers, body)
        except UpstreamError as exc:
            if attempt == 2 or not isinstance(exc, Retryable):
                await _fail(send, status, rec, 502, f"llama-server did not answer: {exc}", "server_error")
                return False
            log.info("proxy_retry", path=target.decode("ascii", "replace"), error=str(exc))
            return None
        if rec is not None and rec.request_body is not None and rec.request_body is not body:
            rec.request_body = body if rec.hold(len(body)) else None  # as sent upstream, when captured
        try:
            return await relay(self.runner, upstream, send, status, predict=predict, extra=extra, rec=rec, carry=carry, ex=ex)
        finally:
            await upstream.aclose()

    async def _fit_context(self, chat: Chat, body: bytes, gen: int) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        """The context guard (web/guard/context.py): the body to send and the header that says what was dropped.
        If llama-server cannot count, the request goes as it came (and llama-server's own 400 applies)."""
        r = self.runner
        t0 = time.perf_counter()
        try:
            fit = await self.context.fit(chat.doc, chat.sizes, gen, r.loaded.profile,
                                         ctx_words(r.loaded.profile, r.machine))
        except ContextRejected as exc:
            raise Rejected(400, f"context guard: {exc.message}") from None
        except CountError as exc:
            self.metrics.context_checks.labels("error").inc()
            log.warning("context_count_failed", error=str(exc))
            return body, []
        finally:
            self.metrics.context_seconds.observe(time.perf_counter() - t0)
        if fit.body is None:
            return body, []
        return fit.body, [(TRIMMED_HEADER, fit.header or b"")]

@dataclass
class Chat:
    """A chat request as it will be sent, for the context guard: the document and its images' sizes."""

    doc: dict[str, Any]
    sizes: list[tuple[int, int] | None]


async def _fail(send: Send, status: list[int], rec: Record | None, code: int, message: str, kind: str,
                headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Answer with an error of the supervisor's own, and write it on the request's record."""
    status[0] = code
    if rec is not None:
        rec.error = message
    await send_simple(send, *json_error(code, message, kind, headers))


def refusal(scope: Scope, raw_path: bytes, route: Route | None) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
    """The allow-list (routes.py): unknown paths, refused routes and wrong methods never reach llama-server."""
    method = scope["method"]
    shown = raw_path.decode("ascii", "backslashreplace")[:200]
    if route is None:
        why = routes.REFUSED.get(raw_path)
        if why is not None:
            return json_error(403, f"{shown}: refused by the supervisor: {why}", "invalid_request_error")
        return json_error(404, f"{method} {shown}: not a route the supervisor forwards", "invalid_request_error")
    if method not in route.methods:
        allow = ", ".join(sorted(route.methods))
        return json_error(405, f"{method} {shown}: method not allowed (allowed: {allow})",
                          "invalid_request_error", [(b"allow", allow.encode())])
    return None
