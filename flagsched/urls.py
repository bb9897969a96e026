"""URLs shown to people: where they point, never their credentials. Pure, no I/O.

A message names a database by host, port and database name, and an HTTP endpoint (a
Pushgateway, a ping URL) by scheme://host:port/path: never by the URL as written, which
may hold a password in a spelling no search-and-replace finds (percent-encoded or not,
`#`, `?` or `/` inside it). Nothing here masks text: what is shown was never secret, and a
message that would quote a secret is withheld whole (`one_line`)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, unquote

from psycopg import ProgrammingError
from psycopg.conninfo import conninfo_to_dict

_HOST_END = re.compile(r"[/?#]")


def _userinfo_end(rest: str) -> int | None:
    """Where the user info ends in `rest` (the URL after `scheme://`): the last `@` that is
    followed by something that reads as a host (no `=` or `&` before the next `/`, `?` or
    `#`: such an `@` sits in a query value). Reading up to the last `@` keeps a password
    with an unencoded `@`, `/`, `?` or `#` out of what follows it."""
    for index in reversed([i for i, c in enumerate(rest) if c == "@"]):
        host = _HOST_END.split(rest[index + 1 :], maxsplit=1)[0]
        if "=" not in host and "&" not in host:
            return index
    return None


def _split(url: str) -> tuple[str | None, str | None, str | None, str]:
    """(scheme, user, password, the rest after the user info), user and password as written."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    end = _userinfo_end(rest)
    if end is None:
        return scheme or None, None, None, rest
    user, colon, password = rest[:end].partition(":")
    return scheme or None, user, password if colon else None, rest[end + 1 :]


def credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """`url` without its user info, and the (user, password) it held, percent-decoded (None
    when it held none): an HTTP client sends them as basic auth, since urllib sends no URL
    user info itself. The user info is read as `describe_url` reads it (up to the last `@`
    before the host)."""
    scheme, user, password, rest = _split(url)
    bare = f"{scheme}://{rest}" if scheme else rest
    if user is None:
        return bare, None
    return bare, (unquote(user), unquote(password or ""))


def describe_url(url: str) -> str:
    """`scheme://host:port/path` of `url`: without user, password, query or fragment (they
    may hold credentials or tokens). For messages about HTTP endpoints."""
    scheme, _, _, rest = _split(url)
    where = re.split(r"[?#]", rest, maxsplit=1)[0]
    return f"{scheme}://{where}" if scheme else where


def _libpq(raw: str) -> dict[str, str]:
    """libpq's own reading of a database URL (the reading a connection gets)."""
    _, sep, rest = raw.partition("://")
    parsed = conninfo_to_dict(f"postgresql://{rest}" if sep else raw)
    return {k: str(v) for k, v in parsed.items() if v is not None}


def database_url_problem(raw: str) -> str | None:
    """Why libpq cannot read a database URL, or would read its user or password otherwise
    than a person does (an unencoded `@` or `/` in them, which would make part of the
    password a host or database name, and so printable); None when it reads as written.
    The reason never quotes the URL."""
    advice = "percent-encode '%', '@' and '/' in the user name and password (%25, %40, %2F)"
    try:
        parsed = _libpq(raw)
    except ProgrammingError:
        return f"not a database URL libpq can read; {advice}"
    _, user, password, _ = _split(raw)
    if (user is not None and parsed.get("user") != unquote(user)) or (
        password is not None and parsed.get("password") != unquote(password)
    ):
        return f"its user name or password would be misread; {advice}"
    return None


def describe_database(raw: str) -> str:
    """The database a URL points at, for messages: `database D at HOST:PORT as USER`."""
    if database_url_problem(raw) is not None:
        return "the database (its URL cannot be read, so it is not shown)"
    parsed = _libpq(raw)
    user = parsed.get("user")
    host = parsed.get("host") or parsed.get("hostaddr") or "the local socket"
    port = parsed.get("port") or "5432"
    name = parsed.get("dbname") or user or "(default)"
    return f"database {name} at {host}:{port}" + (f" as {user}" if user else "")


def url_secrets(raw: str | None) -> list[str]:
    """Strings of a URL no message may show: its password in every spelling it may take
    (as written, decoded, as libpq reads it, or given as ?password=)."""
    if not raw:
        return []
    _, _, password, rest = _split(raw)
    found = [password, unquote(password)] if password else []
    query = rest.partition("?")[2]
    found += [v for k, v in parse_qsl(query) if k.lower() == "password"]
    found += re.findall(r"(?i)password=([^&#]*)", query)  # as written, still encoded
    with contextlib.suppress(ProgrammingError):
        found.append(_libpq(raw).get("password") or "")
    return [s for s in dict.fromkeys(found) if s]


def one_line(text: str, secrets: Iterable[str] = ()) -> str:
    """A message as one readable line. A line that would show one of `secrets` is withheld
    whole: masking a secret inside it could alter other text (a password `flag` turning
    `flag_key` into `***_key`), and withholding cannot."""
    line = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    if any(secret in line for secret in secrets if secret):
        return "(message not shown: it quotes a password)"
    return line


def endpoint_error(exc: BaseException, url: str) -> str:
    """What went wrong talking to an HTTP endpoint, as one line that cannot quote the URL's
    credentials: when the URL holds any (a password, a query), only the exception's kind and
    the operating system's reason (`Connection refused`), which never come from the URL; a
    library's own message may quote a misread URL piece by piece."""
    _, _, password, rest = _split(url)
    if password is None and "?" not in rest:
        return one_line(str(exc))
    reason = getattr(exc, "reason", None)  # urllib's URLError wraps the OSError
    os_error = reason if isinstance(reason, OSError) else exc if isinstance(exc, OSError) else None
    if os_error is not None and os_error.strerror:
        return f"{type(exc).__name__}: {os_error.strerror}"
    return f"{type(exc).__name__} (details not shown: the URL holds credentials)"
