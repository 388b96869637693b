"""pydantic's ValidationError as (field, message) pairs an operator can act on: one flattening for the
settings and the profiles."""

from __future__ import annotations

from pydantic import ValidationError


def pydantic_problems(exc: ValidationError, unknown: str = "unknown field") -> list[tuple[str, str]]:
    """`unknown` is the message for a field the model does not have."""
    out = []
    for err in exc.errors(include_url=False):
        # Unions report one error per branch ("int", "literal[...]", "function-after[...]"): the field name is
        # what an operator needs.
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("int", "literal", "function")))
        msg = unknown if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        out.append((loc, msg))
    # Keep one message per field and problem, in order.
    return list(dict.fromkeys(out))
