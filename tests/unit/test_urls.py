"""URLs in messages: where they point, never their credentials; nothing else altered."""

from __future__ import annotations

from urllib.parse import quote, unquote

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from flagsched.urls import (
    credentials,
    database_url_problem,
    describe_database,
    describe_url,
    one_line,
    url_secrets,
)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://bob:s3cr%40t@db:5432/app", "database app at db:5432 as bob"),
        ("postgres://u:Hash#Secret99@host:1/db", "database db at host:1 as u"),
        ("postgresql+psycopg://u:Hash?Secret@host:1/db", "database db at host:1 as u"),
        ("postgresql://db/app?user=bob&password=s3cret", "database app at db:5432 as bob"),
        ("postgresql:///app", "database app at the local socket:5432"),
        ("postgresql://h1:5432,h2:5433/app", "database app at h1,h2:5432,5433"),
    ],
)
def test_a_database_is_named_by_host_port_and_name(url: str, shown: str) -> None:
    assert database_url_problem(url) is None
    assert describe_database(url) == shown


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:Pq/Zx@host:1/db",  # libpq: host u, port Pq, database Zx@host:1/db
        "postgresql://u:Pq@Zx@host/db",  # libpq: password Pq, host Zx@host
        "postgresql://u:Pq%zzZx@h/d",  # libpq refuses it, quoting the password
    ],
)
def test_a_url_libpq_would_misread_is_a_problem_and_never_quoted(url: str) -> None:
    problem = database_url_problem(url)
    assert problem is not None and "percent-encode" in problem
    shown = describe_database(url)
    for secret in ("Pq", "Zx"):
        assert secret not in problem + shown


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:pa/ss#x?y@push.example:9091/p?token=t", "https://push.example:9091/p"),
        ("http://push:9091", "http://push:9091"),
        ("push.example:9091", "push.example:9091"),
        ("https://hc.example/ping/abc?to=a@b.example&k=v", "https://hc.example/ping/abc"),
    ],
)
def test_describe_url_shows_scheme_host_port_and_path_only(url: str, shown: str) -> None:
    assert describe_url(url) == shown


def test_every_spelling_of_the_password_is_a_secret() -> None:
    secrets = url_secrets("postgresql://bob:s3cr%40t@db/app")
    assert "s3cr@t" in secrets and "s3cr%40t" in secrets
    assert "qs%21" in url_secrets("postgresql://db/app?password=qs%21")
    assert "qs!" in url_secrets("postgresql://db/app?password=qs%21")
    assert url_secrets(None) == [] and url_secrets("postgresql://db/app") == []


def test_one_line_withholds_a_line_quoting_a_secret_and_alters_nothing_else() -> None:
    assert one_line("a\n\tb  ", []) == "a b"
    assert one_line('flag "flag_key-1" failed', ["s3cret"]) == 'flag "flag_key-1" failed'
    withheld = one_line("password s3cret wrong", ["s3cret"])
    assert "s3cret" not in withheld and "not shown" in withheld


_passwords = st.text(st.characters(codec="utf-8", blacklist_characters="\x00"), min_size=1)


@given(password=_passwords, encode=st.booleans())
@example(password="@", encode=False)
def test_no_password_reaches_a_description(password: str, encode: bool) -> None:
    written = quote(password, safe="") if encode else password
    url = f"postgresql://u:{written}@db.example:5432/app"
    shown = describe_database(url) + describe_url(url) + (database_url_problem(url) or "")
    baseline = "database app at db.example:5432 as u postgresql://db.example:5432/app"
    # What these print for any URL, whatever its password: a password that happens to be a
    # piece of that fixed text (such as "@" or "; ") is found there without being leaked.
    fixed = baseline + "".join(
        describe_database(u) + (database_url_problem(u) or "")
        for u in ("postgresql://u:a@b@db.example:5432/app", "postgresql://u:%zz@db.example/app")
    )
    if password not in fixed and written not in fixed:
        assert password not in shown and written not in shown


@given(password=_passwords, encode=st.booleans())
@example(password="p/w?x#y@z", encode=False)
def test_credentials_split_the_login_from_the_endpoint(password: str, encode: bool) -> None:
    """What an HTTP client sends as basic auth is the password as meant (percent-decoded when
    written encoded), and the URL it contacts holds no part of it: the host after the last
    `@`, as `describe_url` shows it."""
    written = quote(password, safe="") if encode else password
    url = f"https://ops:{written}@gw.example:9091/base"
    bare, login = credentials(url)
    assert bare == "https://gw.example:9091/base" == describe_url(url) + ""
    assert login == ("ops", password if encode else unquote(password))
    assert credentials("https://gw.example:9091/") == ("https://gw.example:9091/", None)
