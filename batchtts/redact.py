"""Keeping secrets out of what batchtts writes: logs, the ledger, status and exports.

A provider's error text is the provider's to word, and some echo the request's Authorization
header back. Every text a provider returns passes through `redact` before it goes anywhere: the
run's own key is replaced wherever it appears, and so is anything shaped like a key or a bearer
token. An object-store URI loses the credentials it may carry (`redact_uri`) before it is shown
or recorded.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, urlencode

MASK = "[redacted]"
_LOOKS_LIKE_A_KEY = re.compile(
    r"(?i)\b(?:bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"  # an Authorization header's value
    r"|\bsk-[A-Za-z0-9_-]{8,}"  # OpenRouter's and OpenAI's key shape
    r"|\b(?:api[_-]?key|token|secret|password)\b[\"']?\s*[:=]\s*[\"']?[^\s\"',;]{6,}"  # key=value pairs
)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` without the given secrets (each at least 4 characters) or anything shaped like a key."""
    for secret in secrets:
        if len(secret) >= 4:
            text = text.replace(secret, MASK)
    return _LOOKS_LIKE_A_KEY.sub(_mask_value, text)


def _mask_value(match: re.Match[str]) -> str:
    """Keep the name of what was masked (`Bearer`, `api_key=`), drop its value."""
    found = match.group(0)
    head = re.match(r"(?i)(bearer|basic)\s+|[^:=]*[:=]\s*[\"']?", found)
    if found.lower().startswith("sk-") or head is None:
        return MASK
    return head.group(0) + MASK


_SECRET_OPTION = re.compile(r"key|secret|token|password|credential", re.IGNORECASE)


def redact_uri(uri: str) -> str:
    """An object-store URI fit for logs and the ledger: credentials in it (`s3://KEY:SECRET@bucket`,
    `access_key`, `secret_key`, `session_token`, ... options) are dropped; a user name alone
    (`gs://anonymous@bucket`) and the other options (region, endpoint) are kept."""
    base, _, query = uri.partition("?")
    scheme, sep, rest = base.partition("://")
    authority, slash, path = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    if at and ":" in userinfo:
        base = f"{scheme}{sep}{host}{slash}{path}"
    kept = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if not _SECRET_OPTION.search(k)]
    return f"{base}?{urlencode(kept)}" if kept else base
