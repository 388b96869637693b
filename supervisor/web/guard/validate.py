"""Request bodies: parse once (UTF-8 JSON, bounded depth) and check the shape of the fields llama-server reads.

llama-server answers 500 when a field has the wrong JSON type (its JSON library throws a type error), and accepts
bodies in UTF-16/32 as our own parser would. So the proxy parses strictly and names the field a client got wrong
(`messages[1].content[0].text: expected a string`) before llama-server sees the request. Pure functions: no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from ...core.refusal import Rejected

MAX_DEPTH = 64
# Bodies larger than this are parsed (and hashed) in a worker thread, not on the event loop.
BIG_BODY = 256 * 1024
JSONDoc = dict[str, Any]
Check = Callable[[JSONDoc], None]




def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# Built once: json.loads/dumps with any option build a new decoder/encoder on every call.
_DECODER = json.JSONDecoder(parse_constant=_no_constant)
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def parse_json(body: bytes) -> Any:
    """Strict JSON: UTF-8 only (json.loads on bytes would guess UTF-16/32), no NaN/Infinity, bounded depth."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Rejected(400, f"request body is not UTF-8 (invalid byte at offset {exc.start}): send JSON as UTF-8"
                       ) from None
    try:
        doc = _DECODER.decode(text)
    except RecursionError:
        raise Rejected(400, f"request body is nested too deeply (the limit is {MAX_DEPTH} levels)") from None
    except ValueError as exc:
        raise Rejected(400, f"request body is not valid JSON: {exc}") from None
    # Counting brackets is C-speed; only a body that could be deep pays for the walk.
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and _depth_over(doc, MAX_DEPTH):
        raise Rejected(400, f"request body is nested too deeply (the limit is {MAX_DEPTH} levels)")
    return doc


def _depth_over(doc: Any, limit: int) -> bool:
    stack = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def serialise(doc: Any) -> bytes:
    """What is forwarded is what was checked. Lone surrogates (`"\\ud800"`) and out-of-range numbers (1e999)
    parse in Python but not in llama-server: refused here."""
    try:
        return _ENCODER.encode(doc).encode("utf-8")
    except UnicodeEncodeError:
        raise Rejected(400, "request body has an invalid unicode escape (a lone surrogate)") from None
    except ValueError:
        raise Rejected(400, "request body has a number out of range") from None


# --- shapes --------------------------------------------------------------------------------------------------

def _name(v: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def _fail(where: str, expected: str, got: Any) -> Rejected:
    return Rejected(400, f"{where}: expected {expected}, got {_name(got)}")


def _str(doc: JSONDoc, key: str, where: str, required: bool = False) -> None:
    if key in doc:
        if not isinstance(doc[key], str):
            raise _fail(f"{where}{key}", "a string", doc[key])
    elif required:
        raise Rejected(400, f"{where}{key}: required")


def _str_or_strs(v: Any, where: str) -> None:
    if isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)):
        return
    raise _fail(where, "a string or an array of strings", v)


NUMBERS = ("max_tokens", "max_completion_tokens", "n_predict", "n", "top_k", "seed", "n_probs", "top_logprobs",
           "temperature", "top_p", "min_p", "typical_p", "presence_penalty", "frequency_penalty", "repeat_penalty",
           "repeat_last_n", "dynatemp_range", "dynatemp_exponent", "xtc_probability", "xtc_threshold",
           "mirostat", "mirostat_tau", "mirostat_eta", "n_keep", "n_discard", "id_slot", "n_indent", "t_max_predict_ms")
BOOLEANS = ("stream", "cache_prompt", "return_tokens", "echo", "add_special", "parse_special", "with_pieces")


_KIND = {**dict.fromkeys(NUMBERS, "number"), **dict.fromkeys(BOOLEANS, "bool"), "stop": "stop",
         **dict.fromkeys(("stream_options", "response_format", "chat_template_kwargs"), "object"),
         "logit_bias": "object or array"}


def sampling(doc: JSONDoc) -> None:
    """Numbers where numbers belong (a boolean is not a number here), booleans, stop strings."""
    for key, v in doc.items():  # a body has few fields: walk them, not the list of known ones
        kind = _KIND.get(key)
        if kind is None or v is None:
            continue
        if kind == "number":
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise _fail(key, "a number", v)
        elif kind == "bool":
            if not isinstance(v, bool):
                raise _fail(key, "true or false", v)
        elif kind == "stop":
            _str_or_strs(v, "stop")
        elif not isinstance(v, (dict, list) if kind == "object or array" else dict):
            raise _fail(key, "an object", v)


# The parts llama-server turns into media; the media policy (media.py) looks inside them.
MEDIA_PARTS = ("image_url", "input_audio", "input_video", "video_url")


def _oai_parts(content: list[Any], where: str) -> None:
    for j, part in enumerate(content):
        w = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise _fail(w, "an object with a 'type'", part)
        kind = part.get("type")
        if not isinstance(kind, str):
            raise _fail(f"{w}.type", "a string", kind)
        if kind == "text":
            _str(part, "text", f"{w}.", required=True)
        elif kind in MEDIA_PARTS:
            ref = part.get(kind)
            # llama-server reads image_url as an object; the proxy also takes the bare string and rewrites it
            if not isinstance(ref, dict) and not (kind == "image_url" and isinstance(ref, str)):
                raise _fail(f"{w}.{kind}", "an object with a 'url' (or 'data') string", ref)
            if isinstance(ref, dict):
                for key in ("url", "data"):
                    if key in ref and not isinstance(ref[key], str):
                        raise _fail(f"{w}.{kind}.{key}", "a string", ref[key])
        else:
            raise Rejected(400, f"{w}.type: unsupported content part type {kind!r} (text, {', '.join(MEDIA_PARTS)})")


def _messages(doc: JSONDoc, parts: Callable[[list[Any], str], None]) -> Iterator[tuple[str, JSONDoc]]:
    """`messages`: an array of objects with a string `role` and a string, null or array (checked by `parts`)
    `content`; yields each message with its position."""
    msgs = doc.get("messages")
    if not isinstance(msgs, list):
        raise Rejected(400, "messages: required, an array of messages") if msgs is None else _fail(
            "messages", "an array of messages", msgs)
    for i, msg in enumerate(msgs):
        w = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise _fail(w, "an object with 'role' and 'content'", msg)
        _str(msg, "role", f"{w}.", required=True)
        content = msg.get("content")
        if isinstance(content, list):
            parts(content, f"{w}.content")
        elif content is not None and not isinstance(content, str):
            raise _fail(f"{w}.content", "a string or an array of content parts", content)
        yield w, msg


def _blocks(content: list[Any], where: str) -> None:
    for j, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise _fail(f"{where}[{j}]", "an object with a 'type' string", block)


def chat(doc: JSONDoc) -> None:
    """OpenAI chat completions (also /apply-template and the token-count route)."""
    for w, msg in _messages(doc, _oai_parts):
        for key in ("name", "tool_call_id", "reasoning_content"):
            if msg.get(key) is not None:
                _str(msg, key, f"{w}.")
        calls = msg.get("tool_calls")
        if calls is not None:
            _functions(calls, f"{w}.tool_calls", "arguments")
    if doc.get("tools") is not None:
        _functions(doc["tools"], "tools", "parameters")
    sampling(doc)


def _functions(items: Any, where: str, detail: str) -> None:
    """tools and tool_calls: [{"type": "function", "function": {"name": ..., "parameters"/"arguments": ...}}]."""
    if not isinstance(items, list):
        raise _fail(where, "an array of objects", items)
    for i, item in enumerate(items):
        w = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise _fail(w, "an object", item)
        if item.get("type", "function") != "function":
            raise Rejected(400, f"{w}.type: expected 'function'")
        fn = item.get("function")
        if not isinstance(fn, dict):
            raise _fail(f"{w}.function", "an object with a 'name'", fn)
        _str(fn, "name", f"{w}.function.", required=True)
        value = fn.get(detail)
        if detail == "arguments" and value is not None and not isinstance(value, (str, dict)):
            raise _fail(f"{w}.function.arguments", "a string", value)
        if detail == "parameters" and value is not None and not isinstance(value, dict):
            raise _fail(f"{w}.function.parameters", "an object (a JSON schema)", value)


def completion(doc: JSONDoc) -> None:
    """/completion, /v1/completions: a prompt is a string, tokens, a mix, an object or a list of those."""
    prompt = doc.get("prompt")
    if prompt is not None and not isinstance(prompt, (str, list, dict)):
        raise _fail("prompt", "a string, an array or an object", prompt)
    prompts = prompt if isinstance(prompt, list) else [prompt]
    for i, p in enumerate(prompts):
        if isinstance(p, dict):
            where = f"prompt[{i}]" if isinstance(prompt, list) else "prompt"
            data = p.get("multimodal_data")
            if data is not None and not (isinstance(data, list) and all(isinstance(x, str) for x in data)):
                raise _fail(f"{where}.multimodal_data", "an array of base64 strings", data)
    sampling(doc)


def infill(doc: JSONDoc) -> None:
    for key in ("input_prefix", "input_suffix", "prompt"):
        _str(doc, key, "")
    extra = doc.get("input_extra")
    if extra is not None and not isinstance(extra, list):
        raise _fail("input_extra", "an array of {filename, text} objects", extra)
    sampling(doc)


def tokenize(doc: JSONDoc) -> None:
    content = doc.get("content")
    if content is not None and not (isinstance(content, str) or (
            isinstance(content, list) and all(isinstance(x, str) or (isinstance(x, int) and not isinstance(x, bool))
                                              for x in content))):
        raise _fail("content", "a string or an array of strings and token ids", content)
    sampling(doc)


def detokenize(doc: JSONDoc) -> None:
    tokens = doc.get("tokens")
    if tokens is not None and not (isinstance(tokens, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in tokens)):
        raise _fail("tokens", "an array of token ids", tokens)


def embeddings(doc: JSONDoc) -> None:
    for key in ("input", "content"):
        v = doc.get(key)
        if v is not None and not isinstance(v, (str, list, dict)):
            raise _fail(key, "a string or an array", v)
        if isinstance(v, list):
            for i, item in enumerate(v):
                if isinstance(item, dict) and isinstance(item.get("content"), list):
                    _oai_parts(item["content"], f"{key}[{i}].content")
    _str(doc, "encoding_format", "")


def rerank(doc: JSONDoc) -> None:
    _str(doc, "query", "")
    for key in ("documents", "texts"):
        if doc.get(key) is not None and not (isinstance(doc[key], list) and all(isinstance(x, str) for x in doc[key])):
            raise _fail(key, "an array of strings", doc[key])
    sampling(doc)


def anthropic(doc: JSONDoc) -> None:
    """/v1/messages: Anthropic's shape (llama-server translates it into a chat completion)."""
    for _ in _messages(doc, _blocks):
        pass
    system = doc.get("system")
    if system is not None and not isinstance(system, (str, list)):
        raise _fail("system", "a string or an array of content blocks", system)
    sampling(doc)


def responses(doc: JSONDoc) -> None:
    """/v1/responses: `input` is a string or a list of items."""
    inp = doc.get("input")
    if inp is not None and not isinstance(inp, (str, list)):
        raise _fail("input", "a string or an array of input items", inp)
    for i, item in enumerate(inp if isinstance(inp, list) else ()):
        if not isinstance(item, dict):
            raise _fail(f"input[{i}]", "an object", item)
    _str(doc, "instructions", "")
    sampling(doc)


def any_object(doc: JSONDoc) -> None:
    """Routes whose fields llama-server reads leniently: the body must still be a JSON object."""
