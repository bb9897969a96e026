"""Shipped migrations are frozen: every file under migrations/versions/, and every template of
stored logic under flagsched/sql/stored/ (as `stored/<file>`: migration 0009 renders them),
has its sha256 in shipped.sha256 (sha256sum's format), and must keep it. New logic goes into
a new revision (a changed stored function under a new name, SPEC "Upgrades")."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VERSIONS = ROOT / "migrations" / "versions"
TEMPLATES = ROOT / "flagsched" / "sql" / "stored"
SHIPPED = Path(__file__).with_name("shipped.sha256")


def shipped() -> dict[str, str]:
    """{file name relative to migrations/versions: sha256} as frozen."""
    entries: dict[str, str] = {}
    for line in SHIPPED.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            digest, name = line.split(maxsplit=1)
            entries[name.lstrip("*")] = digest
    return entries


def present() -> dict[str, str]:
    """{file name: sha256} of what is under migrations/versions now (no bytecode caches), and
    of the stored templates (`stored/<file>`)."""
    found = {
        path.relative_to(VERSIONS).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(VERSIONS.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }
    for path in sorted(TEMPLATES.glob("*.sql")):
        found[f"stored/{path.name}"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def test_no_shipped_migration_changed() -> None:
    frozen, now = shipped(), present()
    changed = sorted(n for n, digest in frozen.items() if n in now and now[n] != digest)
    assert not changed, (
        f"shipped migration(s) changed: {', '.join(changed)}. Never edit a shipped "
        "migration (databases already ran it): restore it and add a new revision instead."
    )
    removed = sorted(set(frozen) - set(now))
    assert not removed, (
        f"shipped migration(s) removed: {', '.join(removed)}. A shipped revision stays: restore it."
    )


def test_every_migration_file_is_frozen_explicitly() -> None:
    unlisted = sorted(set(present()) - set(shipped()))
    assert not unlisted, (
        f"{', '.join(unlisted)} under migrations/versions/ has no checksum in "
        f"{SHIPPED.relative_to(ROOT)}. When the revision ships, add its line "
        "(`cd migrations/versions && sha256sum FILE >> ../../tests/migration/shipped.sha256`); "
        "from then on it is never edited."
    )


def test_the_shipped_revisions_are_there() -> None:
    frozen = shipped()
    for number in ("0001", "0002", "0003", "0004", "0005"):
        assert any(name.startswith(number) for name in frozen), number


# What migration 0009 creates, as text: the templates are frozen above, and this pins what
# the Python that renders them (flagsched/sql/stored.py) makes of them for the built-in
# tables, so a change there cannot alter a shipped revision's objects unseen.
RENDERED_0009 = "6afbca99dfe6cbac9ba276e458c9028edcfdea6a4d776dbead803e25ae01a212"


def test_the_objects_of_revision_0009_are_frozen() -> None:
    import importlib

    revision = importlib.import_module("flagsched.migrations.versions.0009_stored_templates")
    from flagsched.sql import stored

    text = "\n".join(create for _, create in stored.creates(revision.BUILT_IN))
    assert hashlib.sha256(text.encode()).hexdigest() == RENDERED_0009, (
        "migration 0009's stored objects render differently: restore flagsched/sql/stored.py "
        "(a change belongs in new templates under new names)"
    )


# 0010's and 0011's objects, as 0009's above: 0011's are derived from 0009's frozen
# templates by substitutions that live in flagsched/sql/stored.py (`DERIVED`).
@pytest.mark.parametrize(
    ("module", "digest"),
    [
        (
            "0010_held_back_in_one_pass",
            "af8301f8b51daf1afd905663c5d3b31376e9a2c81e346075867ea3a164c51d0a",
        ),
        (
            "0011_check_window_clamped",
            "82dfaf95047ad7f12a3c7063ceb6fe3ec771d23d7963306abaa668b3c3443a94",
        ),
    ],
)
def test_the_objects_of_a_later_revision_are_frozen(module: str, digest: str) -> None:
    import importlib

    revision = importlib.import_module(f"flagsched.migrations.versions.{module}")
    from flagsched.sql import stored

    text = "\n".join(create for _, create in stored.creates(revision.BUILT_IN, revision.ROUTINES))
    assert hashlib.sha256(text.encode()).hexdigest() == digest, (
        f"migration {module[:4]}'s stored objects render differently: restore "
        "flagsched/sql/stored.py (a change belongs in new templates under new names)"
    )
