"""The context guard's I/O: what this child's slot holds and what a conversation costs in it, counted by
llama-server itself, then the trim that `core.context.plan_fit` decides.

Counting is layered so most requests pay nothing or next to nothing:
1. a bound that needs no tokenizer (a token covers at least one byte): a conversation well inside the
   slot passes without any call;
2. an estimate from per-message token counts (llama-server's /tokenize, one call for the messages not seen
   before, cached) plus the template's wrapping learned at warmup;
3. within a margin of the limit (a few tokens a message), the exact count: llama-server's own template and
   tokenizer on the whole conversation (/v1/chat/completions/input_tokens, one call);
4. clearly over: trimmed on the estimate to the limit less that margin, with no exact count; when that
   cannot fit, the exact count decides (trim, count again) and gives the 400's numbers.
Images are never sent for counting (llama-server would decode and preprocess each one again, 3-30 ms
here): their cost comes from `ImageCost`, learned at warmup (context_learn.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import structlog

from ...child.runner import Runner
from ...core.context import MessageCost, Plan, plan_fit, reply_room, upper_bound
from ...media.images import OMITTED
from ...spec.profile import Profile
from ..api.upstream import UpstreamError, UpstreamPool
from .context_learn import TEXT_CACHE_MAX, CountError, Learned, count_messages, learn, token_counts

log = structlog.get_logger("context")
# Fields that change what the template renders beyond the messages: with them, only the exact count is trusted.
TEMPLATE_FIELDS = ("tools", "functions", "response_format", "json_schema", "chat_template_kwargs",
                   "continue_final_message", "add_generation_prompt")

TIMEOUT_S = 30.0  # a count llama-server does not answer in this long is given up (the request goes as it came)


class ContextRejected(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass
class Fitted:
    body: bytes | None  # None: send the request as it came
    header: bytes | None = None  # x-context-trimmed value


def message_text(msg: Any) -> str:
    """A message's text as the template sees it (images left out, their cost is counted apart)."""
    if not isinstance(msg, dict):
        return json.dumps(msg)
    content = msg.get("content")
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        text = "".join(p.get("text", "") for p in content
                       if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str))
    else:
        text = ""
    extra = [json.dumps(msg[k]) for k in ("tool_calls", "reasoning_content", "name", "tool_call_id") if k in msg]
    return text + "".join(extra)


def image_slots(msg: Any) -> list[int]:
    """Positions of the image parts in a message's content."""
    content = msg.get("content") if isinstance(msg, dict) else None
    if not isinstance(content, list):
        return []
    return [j for j, p in enumerate(content) if isinstance(p, dict) and p.get("type") == "image_url"]


def strip_images(msgs: list[Any]) -> list[Any]:
    """The messages with every image part as an empty text part: what is counted as text."""
    out = []
    for msg in msgs:
        if image_slots(msg):
            msg = {**msg, "content": [{"type": "text", "text": ""} if isinstance(p, dict) and p.get("type") ==
                                      "image_url" else p for p in msg["content"]]}
        out.append(msg)
    return out


def requested_reply(doc: dict[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens", "n_predict"):
        v = doc.get(key)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


class ContextGuard:
    """Per-request fitting for the proxy; learns each child's figures after its warmup (or on first use)."""

    def __init__(self, runner: Runner, pool: UpstreamPool) -> None:
        self.runner = runner
        self.metrics = runner.metrics
        self.pool = pool
        self.learned: Learned | None = None
        self._learning: tuple[int, asyncio.Task[Learned | None]] | None = None

    @staticmethod
    def enabled(profile: Profile) -> bool:
        fit = profile.images.fit_context
        return fit if fit is not None else profile.mmproj is not None

    async def post(self, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        """A JSON call to the live child (GET without a body) through the proxy's connection pool."""
        base = self.runner.child_url
        if base is None:
            raise CountError("llama-server is not running")
        content = json.dumps(body).encode() if body is not None else None
        try:
            status, data = await self.pool.fetch(base, "POST" if content is not None else "GET", path, content,
                                                 TIMEOUT_S)
        except UpstreamError as exc:
            raise CountError(f"{path}: {exc}") from None
        if status != 200:
            raise CountError(f"{path} answered {status}: {data[:300].decode('utf-8', 'replace')}")
        try:
            out = json.loads(data)
        except ValueError:
            raise CountError(f"{path} answered something that is not JSON") from None
        if not isinstance(out, dict):
            raise CountError(f"{path} answered {type(out).__name__}, not an object")
        return out

    def status(self) -> dict[str, Any] | None:
        """For /status: what the guard knows about the running child (None: the guard is off or has not learned)."""
        learned = self.learned
        if not self.enabled(self.runner.loaded.profile) or learned is None or learned.gen != self.runner.machine.gen:
            return None
        return learned.as_dict()

    async def after_warmup(self, gen: int, warmup: dict[str, Any]) -> None:
        """The runner's hook: learn this child's figures before it is reported ready."""
        if self.enabled(self.runner.loaded.profile):
            await self._learn(gen, warmup)

    async def _learn(self, gen: int, warmup: dict[str, Any] | None) -> Learned | None:
        if self._learning is None or self._learning[0] != gen:
            self._learning = (gen, asyncio.ensure_future(self._do_learn(gen, warmup)))
        return await asyncio.shield(self._learning[1])

    async def _do_learn(self, gen: int, warmup: dict[str, Any] | None) -> Learned | None:
        p = self.runner.loaded.profile
        t0 = time.perf_counter()
        try:
            learned = await learn(self.post, gen, p.images if p.mmproj is not None else None, warmup)
        except (CountError, KeyError, TypeError, ValueError) as exc:
            log.warning("context_learn_failed", gen=gen, error=str(exc) or repr(exc),
                        note="the context guard is off for this child")
            return None
        learned.seconds = round(time.perf_counter() - t0, 4)
        self.learned = learned
        log.info("context_learned", gen=gen, **learned.as_dict())
        return learned

    async def count_texts(self, learned: Learned, texts: list[str]) -> list[int]:
        """Token counts of message texts, by llama-server's tokenizer: one call for all the texts not cached."""
        cache = learned.texts
        todo = list(dict.fromkeys(t for t in texts if t not in cache))
        if todo:
            counts = await token_counts(self.post, todo)
            for t, n in zip(todo, counts, strict=True):
                cache[t] = n
        out = []
        for t in texts:
            cache.move_to_end(t)
            out.append(cache[t])
        while len(cache) > TEXT_CACHE_MAX:
            cache.popitem(last=False)
        return out

    async def count_exact(self, doc: dict[str, Any], msgs: list[Any]) -> int:
        """llama-server's own template and tokenizer on the conversation (images as empty text)."""
        return await count_messages(self.post, strip_images(msgs), {k: doc[k] for k in TEMPLATE_FIELDS if k in doc})

    def _outcome(self, outcome: str) -> None:
        self.metrics.context_checks.labels(outcome).inc()

    async def fit(self, doc: dict[str, Any], sizes: list[tuple[int, int] | None], gen: int, profile: Profile,
                  ctx_note: str) -> Fitted:
        """Fit the chat request `doc` (after the image policy; `sizes` are its images' sizes in order) into one
        slot of child `gen`. Raises ContextRejected when the last user turn alone does not fit."""
        msgs = doc.get("messages")
        if not isinstance(msgs, list) or not msgs:
            self._outcome("skipped")
            return Fitted(None)
        learned = self.learned
        if learned is None or learned.gen != gen:
            # Turned on by a reload, or the warmup's learning failed: learn now (once per child).
            learned = await self._learn(gen, self.runner.warmup)
            if learned is None or learned.gen != gen:
                self._outcome("unlearned")
                return Fitted(None)
        reserve = reply_room(requested_reply(doc), profile.images.reply_tokens, learned.n_ctx)
        limit = learned.n_ctx - reserve
        it = iter(sizes)
        img_costs = [tuple(learned.images.tokens(next(it, None), learned.image_size) for _ in image_slots(m))
                     for m in msgs]
        images = sum(sum(c) for c in img_costs)
        texts = [message_text(m) for m in msgs]
        roles = [str(m.get("role", "")) if isinstance(m, dict) else "" for m in msgs]
        templated = any(k in doc for k in TEMPLATE_FIELDS)
        if not templated and images + upper_bound([len(t.encode()) for t in texts], roles, fixed=learned.fixed,
                                                  per_message=max(learned.wrap.values(), default=0)) <= limit:
            self._outcome("bound")
            return Fitted(None)
        counts = await self.count_texts(learned, texts)
        text_costs = [learned.wrap_for(r) + n for r, n in zip(roles, counts, strict=True)]
        estimate = learned.fixed + sum(text_costs) + images
        # The estimate is off by a few tokens per message at most (how a template joins parts, merges across
        # a message's edges): inside that margin of the limit, the exact count decides.
        margin = 2 * len(msgs) + 8
        if not templated and estimate + margin <= limit:
            self._outcome("estimate")
            return Fitted(None)
        costs = [MessageCost(r, t, c) for r, t, c in zip(roles, text_costs, img_costs, strict=True)]
        if not templated and estimate - margin > limit:
            # Clearly over: trim on the estimate to the limit less the margin, so no exact count is needed.
            plan = plan_fit(costs, fixed=learned.fixed, limit=limit - margin, placeholder=learned.placeholder)
            if plan.fits:
                return await self._trimmed(doc, msgs, plan, plan.saved, plan.prompt, reserve, learned, images > 0)
        before = await self.count_exact(doc, msgs) + images
        if before <= limit:
            self._outcome("counted")
            return Fitted(None)
        fixed = before - sum(text_costs) - images  # so the per-message costs add up to the exact count
        for _ in range(3):
            plan = plan_fit(costs, fixed=fixed, limit=limit, placeholder=learned.placeholder)
            new_msgs = apply_plan(msgs, plan.drop_images, plan.drop_messages)
            kept = sum(c for i, cs in enumerate(img_costs) if i not in plan.drop_messages
                       for k, c in enumerate(cs) if (i, k) not in plan.drop_images)
            after = await self.count_exact(doc, new_msgs) + kept
            if not plan.fits:
                self._outcome("rejected")
                log.warning("context_rejected", needed=after + reserve, prompt=after, reply=reserve,
                            n_ctx=learned.n_ctx, profile=profile.name)
                raise ContextRejected(
                    f"the last user message needs {after + reserve} tokens ({after} for the prompt with the system "
                    f"messages + {reserve} kept for the reply) but profile '{profile.name}' allows {learned.n_ctx} "
                    f"per slot ({ctx_note}); older turns and images were already left out: shorten the message, "
                    "send fewer or smaller images, lower max_tokens, or raise ctx_size")
            if after <= limit:
                return await self._trimmed(doc, msgs, plan, before - after, after, reserve, learned, images > 0)
            fixed += after - plan.prompt  # the estimate was short: plan again with the difference
        self._outcome("trim_failed")
        log.warning("context_trim_failed", prompt=after, limit=limit)
        return Fitted(None)

    async def _trimmed(self, doc: dict[str, Any], msgs: list[Any], plan: Plan, saved: int, prompt: int, reserve: int,
                       learned: Learned, big: bool) -> Fitted:
        """The trimmed request, told to the operator (log, metrics) and to the client (the header)."""
        new_msgs = apply_plan(msgs, plan.drop_images, plan.drop_messages)
        n_images, n_turns, n_msgs = len(plan.drop_images), plan.turns, len(plan.drop_messages)
        self._outcome("trimmed")
        self.metrics.images_dropped.inc(n_images)
        self.metrics.turns_dropped.inc(n_turns)
        self.metrics.context_tokens_saved.inc(saved)
        log.info("context_trimmed", images=n_images, turns=n_turns, messages=n_msgs, tokens_saved=saved,
                 prompt=prompt, reply=reserve, n_ctx=learned.n_ctx)
        new_doc = {**doc, "messages": new_msgs}
        body = await asyncio.to_thread(json.dumps, new_doc) if big else json.dumps(new_doc)
        header = f"images={n_images}; turns={n_turns}; messages={n_msgs}; tokens={saved}"
        return Fitted(body.encode(), header.encode())


def apply_plan(msgs: list[Any], drop_images: tuple[tuple[int, int], ...], drop_messages: tuple[int, ...]
               ) -> list[Any]:
    """The messages without the dropped ones, dropped images replaced by the placeholder text."""
    gone = set(drop_messages)
    by_msg: dict[int, set[int]] = {}
    for i, k in drop_images:
        by_msg.setdefault(i, set()).add(k)
    out = []
    for i, msg in enumerate(msgs):
        if i in gone:
            continue
        if i in by_msg:
            slots = image_slots(msg)
            drop = {slots[k] for k in by_msg[i]}
            msg = {**msg, "content": [{"type": "text", "text": OMITTED} if j in drop else p
                                      for j, p in enumerate(msg["content"])]}
        out.append(msg)
    return out
