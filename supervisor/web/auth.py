"""Who may call what: the API key guards the proxied API, the admin key (or the API key when there is none)
guards the supervisor's own data and actions. /health and the page's shell stay open for balancers and people."""

from __future__ import annotations

import hmac
from collections.abc import Callable

from pydantic import SecretStr

from .errors import Scope, Send, json_error, send_simple


def presented_key(scope: Scope) -> bytes | None:
    for k, v in scope["headers"]:
        if k == b"authorization" and v[:7].lower() == b"bearer ":
            return v[7:].strip()
        if k == b"x-api-key":
            return v.strip()
    return None


def key_ok(scope: Scope, expected: str) -> bool:
    got = presented_key(scope)
    return got is not None and hmac.compare_digest(got, expected.encode())


class Keys:
    """The keys of one supervisor, and the 401 it answers without one."""

    def __init__(self, api_key: SecretStr | None, admin_key: SecretStr | None) -> None:
        self.api = api_key.get_secret_value() if api_key else None
        self.admin = admin_key.get_secret_value() if admin_key else None
        # Fail closed: with any key set, the admin side needs the admin key, or the API key when there is none.
        self.admin_or_api = self.admin or self.api

    def admin_checker(self) -> Callable[[Scope], bool]:
        expected = self.admin_or_api
        return lambda scope: expected is None or key_ok(scope, expected)

    async def refuse(self, scope: Scope, send: Send, *, admin: bool) -> bool:
        """Answer 401 and return True when the request lacks the key its side needs."""
        key = self.admin_or_api if admin else self.api
        if key is None or key_ok(scope, key):
            return False
        await send_simple(send, *json_error(401, self.message(admin), "authentication_error",
                                            [(b"www-authenticate", b"Bearer")]))
        return True

    def message(self, admin: bool) -> str:
        what = "admin key" if admin and self.admin else "API key"
        return f"{what} required: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'"
