"""Secrets (remote API keys, the server's token): checked when read, never shown.

A key is sent in an HTTP header, so a character a header cannot carry is refused when the
key is read, with a message that names where it came from and never the value. Any text
that may hold a key (an error from the HTTP stack, a remote's echo) goes through `scrub`,
which removes the key in every form it is commonly rendered in, not only the raw one.
"""

from __future__ import annotations

import json
from urllib.parse import quote, quote_plus

from edgeai.errors import EdgeAIError


def clean(value: str, name: str, error: type[EdgeAIError] = EdgeAIError) -> str:
    """`value` without surrounding whitespace (a CRLF .env file, a pasted newline).

    Args:
        value: the secret as read.
        name: where it came from, for the message (e.g. "environment variable OPENAI_API_KEY").
        error: the exception class to raise.

    Raises:
        error: the key holds a control or non-ASCII character (it cannot go in a header).
    """
    key = value.strip()
    for i, ch in enumerate(key):
        if not " " <= ch <= "~":
            what = "a non-ASCII character" if ord(ch) > 0x7F else "a control character"
            raise error(
                f"{name} holds {what} (at position {i + 1}), which an HTTP header cannot carry",
                "give the key alone: printable ASCII, nothing around it",
            )
    return key


def renderings(secret: str) -> set[str]:
    """The forms a secret takes in error text: raw, repr, JSON, bytes repr, escapes, URL."""
    return {
        secret,
        repr(secret)[1:-1],
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        repr(secret.encode("utf-8", "backslashreplace"))[2:-1],
        secret.encode("unicode_escape").decode("ascii"),
        quote(secret, safe=""),
        quote_plus(secret),
    }


def scrub(text: str, *secrets: str | None) -> str:
    """`text` with every rendering of each secret replaced by ***."""
    forms = {
        f
        for s in secrets
        if s and len(s.strip()) >= 4
        for f in renderings(s) | renderings(s.strip())
    }
    for form in sorted(forms, key=len, reverse=True):  # longest first: a form may contain another
        if len(form) >= 4:
            text = text.replace(form, "***")
    return text
