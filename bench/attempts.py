"""`python -m bench.attempts [ROWS]`: the claim and the record of one batch whose schedules
carry `attempts` arrays near the 1 MB limit (issue 16, defect 9), before (migration 0004's
flagsched_claim_v1 and the record that appended to the whole array) and after (0006's
flagsched_claim_v2 / flagsched_kept_attempts_v2). Both run on the same rows, each in a
transaction rolled back, on a throwaway PostgreSQL. Prints ms per row and per batch."""

from __future__ import annotations

import sys
import time
from datetime import UTC

import psycopg

from flagsched import migrate, repository
from flagsched.db import Conn
from flagsched.model import Outcome, Result
from flagsched.schema import make_engine
from flagsched.sql import statement
from scripts import pgserver


def _seed(conn: Conn, rows: int) -> int:
    conn.execute(statement("bench_attempts_flags"), {"n": rows})
    conn.execute(statement("bench_attempts_schedules"), {"n": rows})
    conn.commit()
    size = conn.execute(statement("bench_attempts_size"))
    return int(size.fetchone()[0])  # type: ignore[index]


def _old(conn: Conn, rows: int) -> tuple[float, float]:
    with conn.transaction(force_rollback=True):
        started = time.perf_counter()
        claimed = conn.execute(statement("bench_old_claim"), {"n": rows})
        found = claimed.fetchall()
        claim = time.perf_counter() - started
        now = found[0][0]
        started = time.perf_counter()
        conn.execute(
            statement("bench_old_record"),
            {
                "now": now,
                "at": now.astimezone(UTC).isoformat(),
                "ids": [r[1] for r in found],
                "made": [r[-1] for r in found],
            },
        )
        return claim, time.perf_counter() - started


def _new(conn: Conn, rows: int) -> tuple[float, float]:
    with conn.transaction(force_rollback=True):
        started = time.perf_counter()
        now, claimed = repository.claim(conn, limit=rows)
        claim = time.perf_counter() - started
        assert now is not None and len(claimed) == rows
        started = time.perf_counter()
        repository.record(conn, [Result(c, Outcome.APPLIED) for c in claimed], now=now)
        return claim, time.perf_counter() - started


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    server = pgserver.start()
    try:
        url = server.url()
        migrate.upgrade(make_engine(url))
        with psycopg.connect(url) as conn:
            conn.execute(statement("bench_no_statement_timeout"))
            size = _seed(conn, rows)
            print(f"{rows} schedules, attempts of {size:,} bytes each as stored")
            for label, run in (("before", _old), ("after", _new)):
                claim, record = run(conn, rows)
                print(
                    f"{label:6}: claim {claim * 1000:8.0f} ms, record {record * 1000:8.0f} ms"
                    f" ({record * 1000 / rows:.2f} ms/row), batch {(claim + record):6.2f} s"
                )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
