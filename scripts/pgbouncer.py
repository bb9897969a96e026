"""A throwaway PgBouncer in front of a throwaway PostgreSQL (scripts/pgserver.py), for tests.

Transaction pooling with a pool smaller than the number of clients, and PgBouncer's
*default* `ignore_startup_parameters` (none): what a managed platform or a Kubernetes
sidecar typically runs. Like PostgreSQL, it runs as the unprivileged `postgres` user when
started as root, and it listens on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from scripts import pgserver

# Debian's package installs it here, outside a normal user's PATH.
_CANDIDATES = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer")

# The pool settings the tests (and docs/deploy.md's "Behind PgBouncer") use.
POOL_SIZE = 2
MAX_CLIENT_CONN = 100


def binary() -> str | None:
    """The pgbouncer executable, or None when it is not installed."""
    found = shutil.which("pgbouncer")
    if found:
        return found
    return next((c for c in _CANDIDATES if os.access(c, os.X_OK)), None)


def config(*, port: int, server_port: int, workdir: Path, users: list[str]) -> str:
    """pgbouncer.ini: every database of the server (`*`), transaction pooling, 2 server
    connections per database and user, trust authentication (tests only)."""
    return f"""\
[databases]
* = host=127.0.0.1 port={server_port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {workdir / "userlist.txt"}
pool_mode = transaction
default_pool_size = {POOL_SIZE}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = {MAX_CLIENT_CONN}
max_db_connections = {POOL_SIZE}
logfile = {workdir / "pgbouncer.log"}
pidfile = {workdir / "pgbouncer.pid"}
admin_users = {users[0]}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class PgBouncer:
    """A running PgBouncer; `url(direct_url)` turns a server URL into one through it."""

    port: int
    process: subprocess.Popen[bytes]
    workdir: Path
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.workdir / "pgbouncer.log"

    def url(self, direct_url: str) -> str:
        """The same database and user, through the pooler."""
        parts = urlsplit(direct_url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def start(server_port: int, *, users: tuple[str, ...] = ("postgres",)) -> PgBouncer:
    """Start PgBouncer in front of the PostgreSQL listening on 127.0.0.1:`server_port`."""
    executable = binary()
    if executable is None:
        raise FileNotFoundError("pgbouncer is not installed (apt-get install pgbouncer)")
    workdir = Path(tempfile.mkdtemp(prefix="flagsched-pgbouncer-"))
    port = _free_port()
    (workdir / "userlist.txt").write_text("".join(f'"{u}" ""\n' for u in users))
    ini = workdir / "pgbouncer.ini"
    ini.write_text(config(port=port, server_port=server_port, workdir=workdir, users=list(users)))
    pgserver.chown_tree(str(workdir))
    process = subprocess.Popen(
        [*pgserver.unprivileged_prefix(), executable, str(ini)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    bouncer = PgBouncer(port, process, workdir)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log = bouncer.log.read_text() if bouncer.log.exists() else ""
            bouncer.stop()
            raise RuntimeError(f"pgbouncer exited at start: {log[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return bouncer
        except OSError:
            time.sleep(0.05)
    bouncer.stop()
    raise RuntimeError("pgbouncer did not start listening within 10 s")
