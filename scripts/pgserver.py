"""A throwaway PostgreSQL (testing.postgresql) that also works when run as root.

initdb and postgres refuse to run as root. As root, only those two programs run as the
unprivileged `postgres` user, through `setpriv`, which execs them (so signals sent by
testing.postgresql reach postgres itself). As a normal user nothing changes.
"""

from __future__ import annotations

import os
import pwd
import subprocess
from typing import Any

import testing.postgresql


def _unprivileged() -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    try:
        user = pwd.getpwnam(os.environ.get("FLAGSCHED_PG_USER", "postgres"))
    except (
        KeyError
    ) as exc:  # pragma: no cover - a fresh Debian gets it with apt-get install postgresql
        raise RuntimeError(
            "running as root needs an unprivileged 'postgres' system user "
            "(apt-get install postgresql creates it)"
        ) from exc
    return user.pw_uid, user.pw_gid


def unprivileged_prefix() -> list[str]:
    """setpriv to the unprivileged user when running as root, else nothing."""
    ids = _unprivileged()
    if ids is None:
        return []
    uid, gid = ids
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]


def chown_tree(path: str) -> None:
    """Give `path` to the unprivileged user when running as root."""
    ids = _unprivileged()
    if ids is None:
        return
    for root, dirs, files in os.walk(path):
        os.chown(root, *ids)
        for name in dirs + files:
            os.chown(os.path.join(root, name), *ids, follow_symlinks=False)


class Postgresql(testing.postgresql.Postgresql):  # type: ignore[misc]
    """testing.postgresql's server, with initdb and postgres run unprivileged under root."""

    def initialize_database(self) -> None:
        chown_tree(self.base_dir)
        data = os.path.join(self.base_dir, "data")
        if os.path.exists(os.path.join(data, "PG_VERSION")):
            return
        args = [
            *unprivileged_prefix(),
            self.initdb,
            "-D",
            data,
            "--lc-messages=C",
            *self.settings["initdb_args"].split(),
        ]
        done = subprocess.run(args, capture_output=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stderr.decode(errors='replace')}")

    def get_server_commandline(self) -> list[str]:
        chown_tree(self.base_dir)
        command: list[str] = super().get_server_commandline()
        return [*unprivileged_prefix(), *command]


def start(fsync: bool = False, **settings: Any) -> Postgresql:
    """Start a server on a free port; fsync off unless asked (tests), on for benchmarks."""
    args = "-h 127.0.0.1 -F -c logging_collector=off -c max_connections=200"
    if fsync:
        args = args.replace(" -F", "")
    return Postgresql(postgres_args=args, **settings)
