"""The benchmark cases of `make bench`. Each returns its figures and a few lines of detail."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from bench.cluster import (
    DRAIN_TEMPLATE,
    TEMPLATE,
    Cluster,
    Process,
    Ran,
    environment,
    flagsched_command,
    reference_command,
    run,
    run_measuring_memory,
)
from flagsched.db import Conn, Database, connection
from flagsched.sql import statement

DRAIN_FLAGS, DRAIN_SCHEDULES = 10_000, 30_000
DRAIN_ARGS = ("--batch-size", "100", "--max-batches", "1000")


@dataclass(frozen=True, slots=True)
class Figure:
    """One measured figure; one with a target passes or fails."""

    name: str
    value: str
    target: str = ""
    passed: bool | None = None


@dataclass(slots=True)
class Case:
    title: str
    figures: list[Figure] = field(default_factory=list)
    details: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Bench:
    """What every case shares: the server, a scratch folder, repetitions, earlier results."""

    cluster: Cluster
    workdir: Path
    quick: bool = False
    drain_rate: float | None = None  # flagsched's rows/s in case 1, the yardstick of case 4

    def log(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def runs(self, full: int) -> int:
        return max(1, full // 3) if self.quick else full

    @contextmanager
    def database(self, template: str = TEMPLATE) -> Iterator[str]:
        """A fresh database cloned from `template`, dropped afterwards."""
        name = self.cluster.clone(template)
        try:
            yield name
        finally:
            self.cluster.drop(name)


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _ratio_figure(
    name: str, value: float, limit: float, *, at_most: bool = True, shown: str = ""
) -> Figure:
    passed = value <= limit if at_most else value >= limit
    return Figure(
        name, f"{value:.2f}x", f"{'<=' if at_most else '>='} {shown or f'{limit:g}'}x", passed
    )


def _json_events(ran: Ran, event: str) -> list[dict[str, Any]]:
    found = []
    for line in ran.log_lines():
        if f'"{event}"' in line:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == event:
                found.append(record)
    return found


def _in_process_seconds(ran: Ran) -> float | None:
    """The work the process itself timed (flagsched's tick_finished, the reference's line)."""
    for event in ("tick_finished", "reference_finished"):
        records = _json_events(ran, event)
        if records:
            return float(records[-1]["duration_seconds"])
    return None


def prepare_drain_template(b: Bench) -> None:
    """The 30,000 schedules over 10,000 flags every drain starts from, settled and analysed."""
    b.cluster.admin(f"CREATE DATABASE {DRAIN_TEMPLATE} TEMPLATE {TEMPLATE}")
    b.cluster.seed(DRAIN_TEMPLATE, flags=DRAIN_FLAGS, schedules=DRAIN_SCHEDULES)
    b.cluster.vacuum(DRAIN_TEMPLATE)


def _drain_once(b: Bench, kind: str, label: str, setup: str = "") -> tuple[Ran, str]:
    """Run one drain of a fresh copy of the backlog; returns the process and its database."""
    db = b.cluster.clone(DRAIN_TEMPLATE)
    if setup:
        b.cluster.sql(db, setup)
    b.cluster.quiesce()
    url = b.cluster.url_for(db)
    if kind == "record-off":
        b.cluster.sql(db, statement("bench_record_off"))
    if kind == "reference":
        # The best plain code: set-based raw psycopg with psycopg's default prepared
        # statements on a direct connection (not pooler-safe; flagsched is held to pooler
        # rules all the same). Case 9 measures the reference without them.
        argv = reference_command(url, *DRAIN_ARGS, "--prepare")
    else:
        argv = flagsched_command("process", *DRAIN_ARGS)
    return run(argv, environment(url), b.log(label)), db


# -- 1. Drain throughput --------------------------------------------------------------------


def drain_throughput(b: Bench) -> Case:
    case = Case("1. Drain throughput")
    runs = b.runs(7)  # three kinds whose medians differ by ~10 %: seven runs each
    kinds = ["reference", "flagsched", "record-off"]
    times: dict[str, list[float]] = {k: [] for k in kinds}
    inside: dict[str, list[float]] = {k: [] for k in kinds}
    cpu: dict[str, list[float]] = {k: [] for k in kinds}
    problems: list[str] = []
    for i in range(runs):
        # ABC then CBA order, so drift of the machine does not favour any side.
        order = kinds if i % 2 == 0 else kinds[::-1]
        for kind in order:
            ran, db = _drain_once(b, kind, f"drain-{kind}-{i}")
            statuses = b.cluster.statuses(db)
            wrong = b.cluster.final_state_errors(db)
            b.cluster.drop(db)
            if ran.code != 0 or statuses != {"applied": DRAIN_SCHEDULES} or wrong:
                problems.append(f"{kind} run {i}: exit {ran.code}, {statuses}, {wrong} wrong flags")
            times[kind].append(ran.seconds)
            inside[kind].append(_in_process_seconds(ran) or float("nan"))
            cpu[kind].append(ran.cpu_seconds)
            progress(f"drain {kind} run {i + 1}/{runs}: {ran.seconds:.2f} s")
    ref, fs = _median(times["reference"]), _median(times["flagsched"])
    off = _median(times["record-off"])
    b.drain_rate = DRAIN_SCHEDULES / fs
    case.figures += [
        Figure(
            "reference drain (raw psycopg, prepared statements), median",
            f"{ref:.2f} s ({DRAIN_SCHEDULES / ref:,.0f} rows/s)",
        ),
        Figure("flagsched drain, median", f"{fs:.2f} s ({DRAIN_SCHEDULES / fs:,.0f} rows/s)"),
        Figure(
            "flagsched drain without the record's triggers, median",
            f"{off:.2f} s ({DRAIN_SCHEDULES / off:,.0f} rows/s)",
        ),
        _ratio_figure("flagsched time / reference time", fs / ref, 1.5),
        _ratio_figure("flagsched time / the same without the record", fs / off, 1.15),
        Figure(
            "every schedule applied once, flags in their final state",
            "yes" if not problems else "NO",
            "yes",
            not problems,
        ),
    ]
    case.details += [
        f"{DRAIN_SCHEDULES:,} due schedules over {DRAIN_FLAGS:,} flags, `flagsched process "
        f"{' '.join(DRAIN_ARGS)}` and `python -m bench.reference URL {' '.join(DRAIN_ARGS)} "
        "--prepare` (psycopg's default prepared statements, on a direct connection), "
        f"each a whole process on a fresh copy of the backlog, {runs} runs each, in ABC / CBA "
        "order; *record off* is flagsched again with the history triggers on `feature_flags` "
        "disabled (the reference's writes fire them too; attempts and notices are still "
        "written). flagsched logs one JSON line per schedule to a file. *In-process* is the "
        "time the process itself reports (flagsched's `tick_finished`), the rest is "
        "interpreter start, imports, connecting and exit. *CPU* is the CPU time of the "
        "process itself (user + system), PostgreSQL's work not included.",
        "",
        "| run | " + " | ".join(f"{k} s | in-process s | CPU s" for k in kinds) + " |",
        "|---|" + "---|---|---|" * len(kinds),
    ]
    for i in range(runs):
        cells = [f"{times[k][i]:.2f} | {inside[k][i]:.2f} | {cpu[k][i]:.2f}" for k in kinds]
        case.details.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    medians = [
        f"{_median(times[k]):.2f} | {_median(inside[k]):.2f} | {_median(cpu[k]):.2f}" for k in kinds
    ]
    case.details.append("| median | " + " | ".join(medians) + " |")
    waiting = {k: _median([a - c for a, c in zip(inside[k], cpu[k], strict=True)]) for k in kinds}
    case.details += [
        "",
        "Time spent waiting on the server (in-process minus the process's own CPU), median: "
        + ", ".join(f"{k} {waiting[k]:.2f} s" for k in kinds)
        + ". Per batch flagsched does work the reference does not: a claim of only the "
        "schedules that can move (`flagsched_claim_v2`), a safety check per change under the "
        "flag locks (`flagsched_check_v2`: missing, expired, conflict), the attempts kept "
        "with each schedule, a savepoint around the write, and one JSON log line per "
        "schedule on the client.",
    ]
    case.details += [""] + [f"- problem: {p}" for p in problems]
    return case


# -- 2. Claim independent of history --------------------------------------------------------


def claim_vs_history(b: Bench) -> Case:
    from flagsched import repository
    from flagsched.db import Database, transaction
    from flagsched.model import Outcome, Result

    case = Case("2. Claim independent of history")
    batches, limit, rounds = 40, 50, 3
    levels = [0, 100_000, 1_000_000] if not b.quick else [0, 100_000, 300_000]
    databases: dict[int, str] = {}
    for history in levels:
        db = b.cluster.clone(TEMPLATE)
        b.cluster.seed(db, flags=DRAIN_FLAGS, history=history, schedules=rounds * batches * limit)
        b.cluster.seed_changes(db, history)
        b.cluster.vacuum(db)
        databases[history] = db
        progress(f"claim: seeded {history:,} applied rows and {history:,} history rows")
    b.cluster.quiesce()
    targets = {h: Database(b.cluster.url_for(db)) for h, db in databases.items()}
    timings: dict[int, list[float]] = {h: [] for h in levels}
    with _connections(targets) as conns:
        plans = _claim_plans(conns[levels[-1]], limit)
        for history, conn in conns.items():  # warm caches and psycopg's prepared statements
            for _ in range(6):
                with transaction(targets[history], conn, rollback=True):
                    repository.claim(conn, limit=limit)
        for i in range(rounds * batches):
            # Rotate which database goes first, so noise spreads over all of them.
            for history in levels[i % len(levels) :] + levels[: i % len(levels)]:
                conn = conns[history]
                with transaction(targets[history], conn):
                    started = time.perf_counter()
                    now, claimed = repository.claim(conn, limit=limit)
                    timings[history].append(time.perf_counter() - started)
                    if now is None or len(claimed) != limit:
                        raise RuntimeError(f"claim at {history} rows returned {len(claimed)} rows")
                    repository.record(conn, [Result(c, Outcome.APPLIED) for c in claimed], now=now)
    for db in databases.values():
        b.cluster.drop(db)
    means = {h: statistics.fmean(t) * 1000 for h, t in timings.items()}
    medians = {h: statistics.median(t) * 1000 for h, t in timings.items()}
    for history in levels:
        case.figures.append(
            Figure(
                f"claim of {limit} beside {history:,} applied rows and history rows",
                f"mean {means[history]:.2f} ms (median {medians[history]:.2f} ms)",
            )
        )
    case.figures.append(
        _ratio_figure(
            f"mean claim at {levels[-1]:,} / at 0 applied and history rows",
            means[levels[-1]] / means[0],
            1.2,
        )
    )
    case.details += [
        f"`flagsched.repository.claim` called in-process, {batches} batches of {limit} per "
        f"database, {rounds} times over (so {rounds * batches} claims per database), each claim "
        "in its own transaction that records its batch applied (so the backlog of "
        "due schedules moves on; each database also holds as many `feature_flag_changes` "
        "rows as applied ones, written by other actors, which the conflict check probes; "
        "the backlog of "
        f"{rounds * batches * limit:,} due schedules moves on), over {DRAIN_FLAGS:,} flags; the "
        "three databases take turns claim by claim. Only the claim statement is timed, after "
        "six rolled-back warm-up claims per database.",
        "",
        "| applied rows | mean ms | median ms | min ms | max ms |",
        "|---|---|---|---|---|",
    ]
    for history in levels:
        t = [x * 1000 for x in timings[history]]
        case.details.append(
            f"| {history:,} | {means[history]:.2f} | {medians[history]:.2f} "
            f"| {min(t):.2f} | {max(t):.2f} |"
        )
    case.details += [
        "",
        f"`EXPLAIN (ANALYZE, BUFFERS)` of the claim (the statement of `flagsched_claim_v2`, "
        f"limit {limit}) beside "
        f"{levels[-1]:,} applied rows, before the timed claims (each rolled back). First as "
        "a tick's first batch runs it (parameters bound, a custom plan):",
        "",
        "```",
        plans[0],
        "```",
        "",
        "Then the generic plan: PL/pgSQL caches the function's plan and may, after five "
        "executions, keep one plan for any parameters, so this is what the claim runs as in "
        "a drain of many batches (`PREPARE` + `plan_cache_mode = force_generic_plan`):",
        "",
        "```",
        plans[1],
        "```",
    ]
    return case


def _claim_plans(conn: Conn, limit: int) -> tuple[str, str]:
    """EXPLAIN (ANALYZE, BUFFERS) of the claim with a custom and with the generic plan (the
    statement inside flagsched_claim_v2, from the migration that creates it)."""
    import importlib

    revision = importlib.import_module(
        "flagsched.migrations.versions.0006_movable_claim_exact_history"
    )
    claim = revision.claim_query(lock=True, limit="%(limit)s")
    with conn.transaction(force_rollback=True):
        rows = conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + claim, {"limit": limit}).fetchall()
        custom = "\n".join(str(r[0]) for r in rows)
    positional = claim.replace("%(limit)s", "$1")
    with conn.transaction(force_rollback=True):
        conn.execute(statement("bench_generic_plans"))
        conn.execute(f"PREPARE bench_claim (bigint) AS {positional}")
        rows = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS) EXECUTE bench_claim ({limit})").fetchall()
        generic = "\n".join(str(r[0]) for r in rows)
    conn.execute("DEALLOCATE bench_claim")  # a prepared statement outlives its transaction
    return custom, generic


@contextmanager
def _connections(targets: dict[int, Database]) -> Iterator[dict[int, Conn]]:
    """One open connection per database, all closed at the end."""
    conns = {h: database.connect() for h, database in targets.items()}
    try:
        yield conns
    finally:
        for conn in conns.values():
            conn.close()


# -- 3. Cold start --------------------------------------------------------------------------

_BARE = (
    "import os, psycopg\n"
    "with psycopg.connect(os.environ['FLAGSCHED_DATABASE_URL']) as conn:\n"
    "    conn.execute('SELECT 1').fetchone()\n"
)
# Never needed by a tick: the migration machinery and its template engine.
FORBIDDEN_IMPORTS = ("alembic", "mako", "sqlalchemy")


@dataclass(frozen=True, slots=True)
class Imported:
    module: str
    self_us: int
    cumulative_us: int
    depth: int


def parse_importtime(lines: list[str]) -> list[Imported]:
    """`PYTHONPROFILEIMPORTTIME` lines: `import time: self | cumulative | <indent>module`."""
    found = []
    for line in lines:
        if not line.startswith("import time:"):
            continue
        parts = line[len("import time:") :].split("|", 2)
        if len(parts) != 3 or not parts[0].strip().isdigit():
            continue  # the header line
        name = parts[2][1:]  # one space follows the bar; two more per level of nesting
        depth = (len(name) - len(name.lstrip(" "))) // 2
        found.append(Imported(name.strip(), int(parts[0]), int(parts[1]), depth))
    return found


def cold_start(b: Bench) -> Case:
    case = Case("3. Cold start")
    runs = b.runs(9)
    with b.database() as db:
        url = b.cluster.url_for(db)
        commands = {
            "bare": [sys.executable, "-c", _BARE],
            "flagsched": flagsched_command("process"),
        }
        times: dict[str, list[float]] = {k: [] for k in commands}
        cpu: dict[str, list[float]] = {k: [] for k in commands}
        for kind, argv in commands.items():  # warm the page cache once
            run(argv, environment(url), b.log(f"cold-warm-{kind}"))
        for i in range(runs):
            for kind in commands if i % 2 == 0 else reversed(list(commands)):
                ran = run(commands[kind], environment(url), b.log(f"cold-{kind}-{i}"))
                if ran.code != 0:
                    raise RuntimeError(f"{kind} exited {ran.code}: {ran.log_lines()[-3:]}")
                times[kind].append(ran.seconds)
                cpu[kind].append(ran.cpu_seconds)
        rss = {
            kind: run_measuring_memory(argv, environment(url), b.log(f"cold-rss-{kind}")).max_rss_mb
            for kind, argv in commands.items()
        }
        profiled = {
            kind: parse_importtime(
                run(
                    argv,
                    environment(url, PYTHONPROFILEIMPORTTIME="1"),
                    b.log(f"cold-importtime-{kind}"),
                ).log_lines()
            )
            for kind, argv in commands.items()
        }
    bare, fs = _median(times["bare"]), _median(times["flagsched"])
    modules = {m.module for m in profiled["flagsched"]}
    tops = {m.split(".")[0] for m in modules}
    bad = sorted(t for t in tops if t in FORBIDDEN_IMPORTS)
    total_ms = {
        kind: sum(m.cumulative_us for m in found if m.depth == 0) / 1000
        for kind, found in profiled.items()
    }
    case.figures += [
        Figure("bare python + psycopg connect + SELECT 1, median", f"{bare * 1000:.0f} ms"),
        Figure("`flagsched process`, nothing due, median", f"{fs * 1000:.0f} ms"),
        _ratio_figure("flagsched / bare", fs / bare, 1.6),
        Figure(
            f"imports {', '.join(FORBIDDEN_IMPORTS)} during a tick",
            ", ".join(bad) if bad else "none",
            "none",
            not bad,
        ),
    ]
    heaviest = _heaviest_imports(profiled["flagsched"])
    # Optional imports that failed (structlog probes for rich, colorama, ...) are listed by
    # PYTHONPROFILEIMPORTTIME too; keep what is installed.
    third_party = sorted(
        t
        for t in tops
        if t not in sys.stdlib_module_names
        and not t.startswith("_")
        and importlib.util.find_spec(t) is not None
    )
    case.details += [
        f"{runs} runs each, alternating, after one warm-up run each; the database is migrated "
        "and empty. Import time from `PYTHONPROFILEIMPORTTIME=1` (one extra run, not timed): "
        f"flagsched {total_ms['flagsched']:.0f} ms of imports, bare {total_ms['bare']:.0f} ms. "
        f"Peak RSS: flagsched {rss['flagsched']:.0f} MB, bare {rss['bare']:.0f} MB. CPU time, "
        f"median: flagsched {_median(cpu['flagsched']) * 1000:.0f} ms, bare "
        f"{_median(cpu['bare']) * 1000:.0f} ms "
        f"({_median(cpu['flagsched']) / _median(cpu['bare']):.2f}x).",
        "",
        f"Non-stdlib top-level packages a tick imports ({len(modules)} modules in all): "
        + ", ".join(f"`{t}`" for t in third_party),
        "",
        "Heaviest imports of the tick (cumulative, as `PYTHONPROFILEIMPORTTIME` measures them; "
        "what each imports first at 5 ms or more):",
        "",
        "| import | ms | of which |",
        "|---|---|---|",
        *heaviest,
    ]
    return case


def _heaviest_imports(found: list[Imported], count: int = 6) -> list[str]:
    """Table rows: the costliest top-level imports and their costliest direct imports."""
    groups: list[tuple[Imported, list[Imported]]] = []
    children: list[Imported] = []
    for module in found:  # a module is listed after everything it imported
        if module.depth == 1:
            children.append(module)
        elif module.depth == 0:
            groups.append((module, children))
            children = []
    groups.sort(key=lambda g: g[0].cumulative_us, reverse=True)
    rows = []
    for top, kids in groups[:count]:
        big = sorted((k for k in kids if k.cumulative_us >= 5000), key=lambda k: k.cumulative_us)[
            ::-1
        ]
        rows.append(
            f"| `{top.module}` | {top.cumulative_us / 1000:.0f} | "
            + ", ".join(f"`{k.module}` {k.cumulative_us / 1000:.0f}" for k in big)
            + " |"
        )
    return rows


# -- 4. Failure path ------------------------------------------------------------------------


def failure_path(b: Bench) -> Case:
    case = Case("4. Failure path")
    runs = b.runs(3)
    failing_flags = DRAIN_FLAGS // 10
    expected = {
        "applied": DRAIN_SCHEDULES - DRAIN_SCHEDULES // 10,
        "failed": failing_flags,  # the first of each failing flag, waiting for its retry
        "pending": DRAIN_SCHEDULES // 10 - failing_flags,  # held back behind it
    }
    times: list[float] = []
    cpus: list[float] = []
    problems: list[str] = []
    for i in range(runs):
        ran, db = _drain_once(b, "flagsched", f"failure-{i}", statement("bench_failing_trigger"))
        statuses = b.cluster.statuses(db)
        waiting = b.cluster.value(db, statement("bench_injected_waiting"))
        touched = b.cluster.value(db, statement("bench_refusing_flags_enabled"))
        b.cluster.drop(db)
        if ran.code != 0 or statuses != expected or waiting != failing_flags or touched:
            problems.append(
                f"run {i}: exit {ran.code}, {statuses}, {waiting} waiting, {touched} touched"
            )
        times.append(ran.seconds)
        cpus.append(ran.cpu_seconds)
        progress(f"failure path run {i + 1}/{runs}: {ran.seconds:.2f} s")
    seconds = _median(times)
    handled = expected["applied"] + expected["failed"]
    rate = handled / seconds
    base = b.drain_rate or float("nan")
    case.figures += [
        Figure(
            "drain with 10 % failing, median",
            f"{seconds:.2f} s ({rate:,.0f} rows/s, {handled:,} schedules decided)",
        ),
        Figure("case 1 flagsched rate", f"{base:,.0f} rows/s"),
        _ratio_figure(
            "failure-path rate / case 1 rate", rate / base, 1 / 3, at_most=False, shown="1/3"
        ),
        Figure(
            "failures isolated (only failing flags retried, the rest applied)",
            "yes" if not problems else "NO",
            "yes",
            not problems,
        ),
    ]
    case.details += [
        f"The backlog of case 1 with a `BEFORE UPDATE` trigger on `feature_flags` raising for "
        f"every flag whose number ends in 0 ({failing_flags:,} flags, "
        f"{DRAIN_SCHEDULES // 10:,} schedules). Expected end state: {expected}: the first "
        "schedule of each failing flag waits for its retry, the later ones are held back. "
        "Rate = schedules decided (applied + retry) / wall time. "
        "Runs: "
        + ", ".join(f"{t:.2f} s (CPU {c:.2f} s)" for t, c in zip(times, cpus, strict=True))
        + ".",
        *[f"- problem: {p}" for p in problems],
    ]
    return case


# -- 5. Overlap -----------------------------------------------------------------------------


def overlap(b: Bench) -> Case:
    case = Case("5. Overlap")
    case.details += [
        f"N `flagsched process {' '.join(DRAIN_ARGS)}` started together on one copy of the "
        f"case 1 backlog ({DRAIN_SCHEDULES:,} schedules), with statement-level audit triggers "
        "recording every schedule written as applied and every flag write in commit order "
        "(the rollout of a flag's n-th schedule is n, so an out-of-order write shows as a "
        "rollout going down). Rows/s of a process = schedules it logged applied / its wall time.",
        "",
        "| processes | wall s | total rows/s | rows/s per process | applications | "
        "duplicates | order violations | wrong final states | exit codes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    all_ok = True
    for n in (1, 2, 4):
        db = b.cluster.clone(DRAIN_TEMPLATE)
        b.cluster.sql(db, statement("bench_audit_triggers"))
        b.cluster.quiesce()
        url = b.cluster.url_for(db)
        procs = [
            Process(
                flagsched_command("process", *DRAIN_ARGS), environment(url), b.log(f"ov{n}-{k}")
            )
            for k in range(n)
        ]
        done = [p.wait() for p in procs]
        wall = max(r.seconds for r in done)
        applied_each = [len(_json_events(r, "schedule_applied")) for r in done]
        logged_ids = [e["schedule_id"] for r in done for e in _json_events(r, "schedule_applied")]
        applications, distinct = b.cluster.rows(db, statement("bench_applications"))[0]
        violations = b.cluster.value(db, statement("bench_order_violations"))
        wrong = b.cluster.final_state_errors(db)
        statuses = b.cluster.statuses(db)
        b.cluster.drop(db)
        duplicates = applications - distinct + (len(logged_ids) - len(set(logged_ids)))
        ok = (
            duplicates == 0
            and distinct == DRAIN_SCHEDULES
            and statuses == {"applied": DRAIN_SCHEDULES}
            and sum(applied_each) == DRAIN_SCHEDULES
            and violations == 0
            and wrong == 0
            and all(r.code == 0 for r in done)
        )
        all_ok = all_ok and ok
        each = ", ".join(f"{a / r.seconds:,.0f}" for a, r in zip(applied_each, done, strict=True))
        case.details.append(
            f"| {n} | {wall:.2f} | {DRAIN_SCHEDULES / wall:,.0f} | {each} | {applications:,} "
            f"| {duplicates} | {violations} | {wrong} | {sorted({r.code for r in done})} |"
        )
        case.figures.append(
            Figure(
                f"{n} process{'es' if n > 1 else ''}: total rows/s (per process)",
                f"{DRAIN_SCHEDULES / wall:,.0f} ({each})",
            )
        )
        progress(f"overlap x{n}: {wall:.2f} s, {duplicates} duplicates")
    case.figures.append(
        Figure(
            "no duplicate application, per-flag order kept, all applied",
            "yes" if all_ok else "NO",
            "yes",
            all_ok,
        )
    )
    return case


# -- 6. Memory ------------------------------------------------------------------------------


def memory(b: Bench) -> Case:
    case = Case("6. Memory")
    runs, batch = 3, 1000
    peaks: list[float] = []
    with b.database() as db:
        b.cluster.seed(db, flags=DRAIN_FLAGS, schedules=runs * batch)
        b.cluster.vacuum(db)
        url = b.cluster.url_for(db)
        for i in range(runs):
            ran = run_measuring_memory(
                flagsched_command("process", "--batch-size", str(batch)),
                environment(url),
                b.log(f"memory-{i}"),
            )
            applied = len(_json_events(ran, "schedule_applied"))
            if ran.code != 0 or applied != batch:
                raise RuntimeError(f"memory run {i}: exit {ran.code}, {applied} applied")
            peaks.append(ran.max_rss_mb)
    peak = max(peaks)
    case.figures += [
        Figure(
            f"peak RSS of `flagsched process --batch-size {batch}`",
            f"{peak:.1f} MB",
            "< 100 MB",
            peak < 100,
        )
    ]
    case.details += [
        f"{runs} runs, each applying {batch:,} due schedules in one batch; peak resident set "
        "size of the process from `wait4` rusage, taken by a small launcher so that the bench's "
        "own size does not leak into the figure (highest of the runs: "
        f"{', '.join(f'{p:.1f}' for p in peaks)} MB)."
    ]
    return case


# -- 7. Memory with hostile rows ------------------------------------------------------------

HOSTILE_ROWS, HOSTILE_BYTES, HOSTILE_LIMIT_MB = 100, 2 * 1024 * 1024, 256.0


def hostile_memory(b: Bench) -> Case:
    """100 due schedules whose `updates` are 2 MB each, in one batch of 100: the claim ships
    none of them whole, so the tick stays under the CronJob's 256 MiB whatever rows hold."""
    case = Case("7. Memory with hostile rows")
    with b.database() as db:
        seed = statement(
            "bench_seed_hostile",
            literals={"hostile_size": HOSTILE_BYTES - 20, "hostile_rows": HOSTILE_ROWS},
        )
        b.cluster.sql(db, seed)
        size = b.cluster.value(db, statement("bench_smallest_updates"))
        url = b.cluster.url_for(db)
        ran = run_measuring_memory(
            flagsched_command("process", "--batch-size", str(HOSTILE_ROWS)),
            environment(url),
            b.log("memory-hostile"),
        )
        failed = len(_json_events(ran, "schedule_failed"))
        longest = b.cluster.value(db, statement("bench_longest_error"))
        if ran.code != 1 or failed != HOSTILE_ROWS:
            raise RuntimeError(f"hostile memory run: exit {ran.code}, {failed} failed")
    peak = ran.max_rss_mb
    case.figures += [
        Figure(
            f"peak RSS, {HOSTILE_ROWS} rows of 2 MB `updates`, `--batch-size {HOSTILE_ROWS}`",
            f"{peak:.1f} MB",
            f"< {HOSTILE_LIMIT_MB * 1.048576:.0f} MB (256 MiB)",
            peak < HOSTILE_LIMIT_MB * 1.048576,
        )
    ]
    case.details += [
        f"{HOSTILE_ROWS} due schedules, each with `updates` of {size:,} bytes (one string in "
        f"`enabled`), claimed in one batch; every one fails for good (exit 1), the longest "
        f"`last_error` is {longest} characters. Peak resident set size of the process as in "
        "case 6. The claim ships Python no `updates` larger than 8,192 bytes (a valid one is "
        "a few dozen), so the figure stays near an ordinary tick's."
    ]
    return case


# -- 8. `flagsched list` beside applied history --------------------------------------------


def list_vs_history(b: Bench) -> Case:
    from flagsched import repository
    from flagsched.db import Database, transaction
    from flagsched.model import Status

    case = Case("8. `flagsched list` independent of history")
    history = 1_000_000 if not b.quick else 200_000
    open_rows, rounds = 5_000, b.runs(60)
    queries: dict[str, dict[str, Any]] = {
        "open (default)": {},
        "open, --flag": {"flag_key": "flag-00042"},
        "--status pending": {"status": Status.PENDING},
        "open, --from now --to 2100": {"start": "now", "end": "2100-01-01T00:00:00Z"},
    }
    # Reads of history itself: shown, not held to the target (they walk what they read).
    history_queries: dict[str, dict[str, Any]] = {
        "--status applied --flag": {"status": Status.APPLIED, "flag_key": "flag-00042"},
        "--status applied": {"status": Status.APPLIED},
    }
    databases: dict[int, str] = {}
    for level in (0, history):
        db = b.cluster.clone(TEMPLATE)
        b.cluster.seed(db, flags=DRAIN_FLAGS, history=level)
        b.cluster.sql(db, statement("bench_seed_open"), {"count": open_rows})
        b.cluster.vacuum(db)
        databases[level] = db
        progress(f"list: seeded {level:,} applied rows")
    b.cluster.quiesce()
    targets = {h: Database(b.cluster.url_for(db)) for h, db in databases.items()}
    timings: dict[tuple[int, str], list[float]] = {}
    plans: dict[str, str] = {}
    with _connections(targets) as conns:
        # Round by round, the two databases side by side, so drift of the machine touches
        # both alike; sub-millisecond timings are compared by their medians.
        for i in range(rounds + 3):
            for name, filters in {**queries, **history_queries}.items():
                for level, conn in conns.items():
                    if level == 0 and name in history_queries:
                        continue
                    with transaction(targets[level], conn, rollback=True):
                        started = time.perf_counter()
                        rows = repository.list_schedules(conn, limit=100, **filters)
                        elapsed = time.perf_counter() - started
                    if not rows and name in queries:
                        raise RuntimeError(f"list {name} at {level} returned nothing")
                    if i >= 3:  # after warm-up
                        timings.setdefault((level, name), []).append(elapsed)
        conn = conns[history]
        for name, filters in {**queries, **history_queries}.items():
            plans[name] = _list_plan(conn, filters)
    for db in databases.values():
        b.cluster.drop(db)
    means = {k: statistics.fmean(t) * 1000 for k, t in timings.items()}
    medians = {k: statistics.median(t) * 1000 for k, t in timings.items()}
    for name in queries:
        case.figures.append(
            Figure(
                f"list {name}, limit 100, beside {history:,} applied rows",
                f"median {medians[(history, name)]:.2f} ms "
                f"(vs {medians[(0, name)]:.2f} ms beside none)",
            )
        )
    worst = max(medians[(history, n)] / medians[(0, n)] for n in queries)
    case.figures.append(
        _ratio_figure(f"worst median list at {history:,} / at 0 applied rows", worst, 1.5)
    )
    case.details += [
        f"`flagsched.repository.list_schedules` in-process, limit 100, {rounds} times per "
        f"query and database after three warm-up calls, each in its own rolled-back "
        f"transaction; {open_rows:,} open schedules (one in ten failed and waiting for a "
        f"retry) over {DRAIN_FLAGS:,} flags, beside 0 and beside {history:,} applied ones.",
        "",
        "| query | mean ms beside 0 | mean ms beside history | min | max |",
        "|---|---|---|---|---|",
    ]
    for name in queries:
        t = [x * 1000 for x in timings[(history, name)]]
        case.details.append(
            f"| {name} | {means[(0, name)]:.2f} | {means[(history, name)]:.2f} "
            f"| {min(t):.2f} | {max(t):.2f} |"
        )
    for name in history_queries:
        t = [x * 1000 for x in timings[(history, name)]]
        case.details.append(
            f"| {name} (history, no target) | - | {statistics.fmean(t):.2f} "
            f"| {min(t):.2f} | {max(t):.2f} |"
        )
    case.details += ["", f"Plans beside {history:,} applied rows (`EXPLAIN (ANALYZE)`):", ""]
    for name, plan in plans.items():
        case.details += [f"{name}:", "", "```", plan, "```", ""]
    return case


def _list_plan(conn: Conn, filters: dict[str, Any]) -> str:
    """EXPLAIN ANALYZE of the list statement with these filters (via the repository's SQL)."""
    from flagsched import repository

    captured: list[str] = []
    real = repository._rows

    def explain(c: Conn, factory: Any, sql: str, params: Any = None, **_: Any) -> list[Any]:
        rows = c.execute("EXPLAIN (ANALYZE, COSTS OFF) " + sql, params).fetchall()
        captured.append("\n".join(str(r[0]) for r in rows))
        return []

    repository._rows = explain  # type: ignore[assignment]
    try:
        with conn.transaction(force_rollback=True):
            repository.list_schedules(conn, limit=100, **filters)
    finally:
        repository._rows = real
    return captured[0]


# -- 9. Per-transaction settings -------------------------------------------------------------


def settings_cost(b: Bench) -> Case:
    """What `SET LOCAL` of the session settings at the start of every transaction (so that
    they hold behind a transaction-mode pooler) costs, against a bare BEGIN, which is what a
    transaction cost when the settings travelled once per connection as startup options."""
    case = Case("9. Per-transaction settings")
    rounds, per_round = b.runs(6), 2000
    with b.database() as db:
        database = Database(b.cluster.url_for(db))
        bare, ours = statement("bench_bare_begin"), database.begin_sql()
        seconds: dict[str, list[float]] = {bare: [], ours: []}
        with connection(database) as conn:
            for i in range(rounds):
                for begin in (bare, ours) if i % 2 == 0 else (ours, bare):  # ABBA
                    started = time.perf_counter()
                    for _ in range(per_round):
                        conn.execute(begin)
                        conn.commit()
                    seconds[begin].append((time.perf_counter() - started) / per_round)
    # The other half of pooler safety: no server-side prepared statements. The reference
    # drain (pooler-safe like flagsched) against itself with psycopg's default preparing.
    drains: dict[bool, list[float]] = {False: [], True: []}
    for i in range(2 * b.runs(3)):
        prepare = i % 4 in (1, 2)  # ABBA
        db = b.cluster.clone(DRAIN_TEMPLATE)
        b.cluster.quiesce()
        url = b.cluster.url_for(db)
        extra = ["--prepare"] if prepare else []
        ran = run(reference_command(url, *DRAIN_ARGS, *extra), environment(url), b.log(f"p{i}"))
        statuses = b.cluster.statuses(db)
        b.cluster.drop(db)
        if ran.code != 0 or statuses != {"applied": DRAIN_SCHEDULES}:
            raise RuntimeError(f"reference drain {i}: exit {ran.code}, {statuses}")
        drains[prepare].append(_in_process_seconds(ran) or ran.seconds)
    unprepared, prepared = _median(drains[False]), _median(drains[True])
    base_us, with_us = _median(seconds[bare]) * 1e6, _median(seconds[ours]) * 1e6
    extra_us = with_us - base_us
    # A drain of case 1: one transaction per batch, plus the schema check and the backlog.
    transactions = DRAIN_SCHEDULES // int(DRAIN_ARGS[1]) + 2
    case.figures += [
        Figure("BEGIN + COMMIT, median", f"{base_us:.0f} us"),
        Figure("BEGIN; SET LOCAL x5 + COMMIT, median", f"{with_us:.0f} us"),
        Figure("cost of the settings per transaction", f"{extra_us:+.0f} us"),
        Figure(
            "reference drain without / with prepared statements, in-process median",
            f"{unprepared:.2f} s / {prepared:.2f} s ({unprepared / prepared - 1:+.0%})",
        ),
    ]
    if b.drain_rate is not None:
        share = extra_us * 1e-6 * transactions / (DRAIN_SCHEDULES / b.drain_rate)
        case.figures.append(
            Figure(
                "their share of the flagsched drain (case 1)",
                f"{share:.1%}",
                "<= 5 %",
                share <= 0.05,
            )
        )
    case.details += [
        f"One connection, {rounds} rounds of {per_round:,} empty transactions each way in ABBA "
        "order: `BEGIN` alone, and flagsched's own start of a transaction, "
        f"`{ours}`, sent as one simple-protocol query (one round trip), each followed by "
        f"COMMIT. The drain of case 1 runs {transactions} transactions (one per batch of "
        f"{DRAIN_ARGS[1]}, the schema check, the backlog), so the settings add "
        f"{extra_us * transactions / 1000:.1f} ms to it.",
        "",
        "No server-side prepared statements (a transaction-mode pooler may run the next "
        "transaction on a server connection that never saw them) means PostgreSQL parses "
        "and plans every statement of every batch. What that costs is measured on the "
        f"reference drain, which follows the same rules: {len(drains[False])} runs as it is "
        "and as many with `--prepare` (psycopg's default: prepare a statement from its "
        f"5th execution), ABBA, in-process times "
        f"{', '.join(f'{t:.2f}' for t in drains[False])} s without and "
        f"{', '.join(f'{t:.2f}' for t in drains[True])} s with. flagsched pays the same: its "
        "ratio in case 1 is against the pooler-safe reference.",
    ]
    return case


# -- 10. Migrate under load -----------------------------------------------------------------

MIGRATE_FROM = "0003"
MIGRATE_SCHEDULES, MIGRATE_APPLIED = 1_000_000, 900_000

# What an application does meanwhile, each statement on its own (autocommit), one after
# another: switch a flag, and add a schedule.
_APP_WRITES = {
    "flag UPDATE": statement("app_flag_update"),
    "schedule INSERT": statement("app_schedule_insert"),
}

# The migration as it ran before revisions got a transaction each: alembic inside one
# transaction that flagsched opened (env.py's per-revision transactions then do nothing).
_ONE_TRANSACTION = """
import sys
from alembic import command
from flagsched import migrate
from flagsched.schema import begin, make_engine
cfg = migrate.config()
with begin(make_engine(sys.argv[1], statement_timeout=None)) as conn:
    cfg.attributes["connection"] = conn
    command.upgrade(cfg, "head")
"""


class _Writer(threading.Thread):
    """One application connection running `statement` in a loop; keeps each one's start
    and duration."""

    def __init__(self, url: str, statement: str) -> None:
        super().__init__(daemon=True)
        self.url, self.statement = url, statement
        self.stop = threading.Event()
        self.timings: list[tuple[float, float]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.url, autocommit=True) as conn:
                n = 0
                while not self.stop.is_set():
                    started = time.perf_counter()
                    conn.execute(self.statement, {"n": n})
                    self.timings.append((started, time.perf_counter() - started))
                    n += 1
        except BaseException as exc:  # reported by the case
            self.error = exc


class _Revisions(threading.Thread):
    """Polls alembic_version: when each revision was seen committed."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.stop = threading.Event()
        self.seen: list[tuple[float, str]] = []

    def run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.stop.is_set():
                row = conn.execute(statement("schema_revision")).fetchone()
                version = str(row[0]) if row else ""
                if not self.seen or self.seen[-1][1] != version:
                    self.seen.append((time.perf_counter(), version))
                self.stop.wait(0.02)

    def windows(self, started: float, order: list[str]) -> list[tuple[str, float, float]]:
        """(revisions, from, to): each stretch of time until the next revision was seen
        committed, named by the revisions that commit ended (several: one transaction)."""
        found, committed, since = [], MIGRATE_FROM, started
        for at, version in self.seen:
            if version == committed or version not in order:
                continue
            done = order[order.index(committed) + 1 : order.index(version) + 1]
            found.append(("+".join(done), since, at))
            committed, since = version, at
        return found


def _migrate_under_load(b: Bench, mode: str) -> dict[str, Any]:
    from flagsched import migrate
    from flagsched.schema import make_engine

    with b.database("template0") as db:  # empty: migrated to MIGRATE_FROM here
        url = b.cluster.url_for(db)
        engine = make_engine(url)
        migrate.upgrade(engine, MIGRATE_FROM)
        engine.dispose()
        b.cluster.seed(
            db,
            flags=10_000,
            history=MIGRATE_APPLIED,
            schedules=MIGRATE_SCHEDULES - MIGRATE_APPLIED,
        )
        b.cluster.vacuum(db)
        b.cluster.quiesce()
        writers = {name: _Writer(url, sql) for name, sql in _APP_WRITES.items()}
        revisions = _Revisions(url)
        threads: list[_Writer | _Revisions] = [*writers.values(), revisions]
        for thread in threads:
            thread.start()
        time.sleep(1)  # the writers at their pace before migrate starts
        argv = (
            flagsched_command("migrate")
            if mode == "per revision"
            else [sys.executable, "-c", _ONE_TRANSACTION, url]
        )
        started = time.perf_counter()
        ran = run(argv, environment(url), b.log(f"migrate-load-{mode.replace(' ', '-')}"))
        finished = time.perf_counter()
        time.sleep(0.5)
        for thread in threads:
            thread.stop.set()
            thread.join(timeout=60)
        at = b.cluster.value(db, statement("schema_revision"))
    order = [MIGRATE_FROM, *_revisions_after(MIGRATE_FROM)]
    result: dict[str, Any] = {"seconds": ran.seconds, "code": ran.code, "at": at}
    result["errors"] = [str(w.error) for w in writers.values() if w.error]
    result["windows"] = []
    for revision, since, until in revisions.windows(started, order):
        longest = {
            name: max(
                (d for s, d in w.timings if since <= s + d / 2 < until),
                default=0.0,
            )
            for name, w in writers.items()
        }
        result["windows"].append((revision, until - since, longest))
    during = {
        name: [d for s, d in w.timings if s + d >= started and s <= finished]
        for name, w in writers.items()
    }
    result["statements"] = {name: len(d) for name, d in during.items()}
    result["median"] = {name: _median(d) if d else 0.0 for name, d in during.items()}
    result["longest"] = {name: max(d, default=0.0) for name, d in during.items()}
    return result


def _revisions_after(revision: str) -> list[str]:
    from alembic.script import ScriptDirectory

    from flagsched import migrate

    script = ScriptDirectory.from_config(migrate.config())
    chain = [s.revision for s in reversed(list(script.walk_revisions()))]
    return chain[chain.index(revision) + 1 :]


def _worst(result: dict[str, Any], writer: str) -> tuple[float, str]:
    """The longest wait of `writer` during the migration, and the revision it fell in."""
    waits = [(longest[writer], revision) for revision, _, longest in result["windows"]]
    return max(waits, default=(result["longest"][writer], "?"))


def migrate_under_load(b: Bench) -> Case:
    case = Case("10. Migrate under load")
    modes = ["per revision", "one transaction"]
    results = {mode: _migrate_under_load(b, mode) for mode in modes}
    ours, before = results["per revision"], results["one transaction"]
    head = _revisions_after(MIGRATE_FROM)[-1]
    ok = all(r["code"] == 0 and r["at"] == head and not r["errors"] for r in results.values())
    flag, flag_in = _worst(ours, "flag UPDATE")
    insert, insert_in = _worst(ours, "schedule INSERT")
    case.figures += [
        Figure(
            f"`flagsched migrate` {MIGRATE_FROM} -> head, {MIGRATE_SCHEDULES:,} schedules",
            f"{ours['seconds']:.1f} s",
        ),
        Figure(
            "longest wait of an application's flag UPDATE during it",
            f"{flag * 1000:.0f} ms (in {flag_in})",
        ),
        Figure(
            "the same, all revisions in one transaction (as before)",
            f"{_worst(before, 'flag UPDATE')[0] * 1000:.0f} ms",
        ),
        Figure(
            "longest wait of an application's schedule INSERT",
            f"{insert * 1000:.0f} ms (in {insert_in})",
        ),
        Figure("migrated, writers never failed", "yes" if ok else "NO", "yes", ok),
    ]
    case.details += [
        f"A database at revision {MIGRATE_FROM} with 10,000 flags and {MIGRATE_SCHEDULES:,} "
        f"schedules ({MIGRATE_APPLIED:,} applied, the rest pending), vacuumed; then "
        "`flagsched migrate` as a process (as the migrate Job runs it) while two application "
        "connections write in a loop, each statement on its own: a single-row UPDATE of a "
        "flag's rollout, and an INSERT of a schedule. A *wait* is the time one statement "
        "took, seen from the bench process; it counts for the revision whose transaction "
        "was running at its middle (alembic_version polled every 20 ms; a revision's time "
        "includes the process start for the first). *One transaction* is the same "
        "migration run as `migrate` ran it before revisions got a transaction each (alembic "
        "inside one transaction flagsched opened).",
        "",
        "| mode | migrate s | writer | statements | median ms | longest ms |",
        "|---|---|---|---|---|---|",
    ]
    for mode, r in results.items():
        for name in _APP_WRITES:
            case.details.append(
                f"| {mode} | {r['seconds']:.1f} | {name} | {r['statements'][name]:,} | "
                f"{r['median'][name] * 1000:.1f} | {r['longest'][name] * 1000:.0f} |"
            )
    case.details += [
        "",
        "Per revision (longest wait of each writer while it ran):",
        "",
        "| mode | revision | s | " + " | ".join(f"{n} ms" for n in _APP_WRITES) + " |",
        "|---|---|---|" + "---|" * len(_APP_WRITES),
    ]
    for mode, r in results.items():
        for revision, seconds, longest in r["windows"]:
            cells = " | ".join(f"{longest[n] * 1000:.0f}" for n in _APP_WRITES)
            case.details.append(f"| {mode} | {revision} | {seconds:.2f} | {cells} |")
    case.details += [""] + [f"- problem: {e}" for r in results.values() for e in r["errors"]]
    return case


# -- 11. `flagsched agenda --html` beside applied history -----------------------------------

AGENDA_FLAGS, AGENDA_STEPS = 200, 5  # 200 ramps of 5 steps: 1,000 open schedules


def agenda_vs_list(b: Bench) -> Case:
    """`agenda --html` for the default 7 days against `list` of the same open schedules, both
    as cron or an operator runs them (the console script, a new process each), beside a
    million applied schedules."""
    from datetime import timedelta

    from flagsched import operators, page, projection, repository
    from flagsched.db import Database, begin
    from flagsched.model import OnConflict, Updates

    case = Case("11. `flagsched agenda --html` beside applied history")
    history = 1_000_000 if not b.quick else 200_000
    rounds = b.runs(15)
    db = b.cluster.clone(TEMPLATE)
    try:
        b.cluster.seed(db, flags=AGENDA_FLAGS, history=history, flag_span=AGENDA_FLAGS)
        database = Database(b.cluster.url_for(db))
        with begin(database) as conn:
            for n in range(AGENDA_FLAGS):
                now = repository.db_now(conn)
                repository.insert_ramp(
                    conn,
                    flag_key=f"flag-{n:05d}",
                    start=now + timedelta(minutes=30 + n),
                    every=timedelta(days=1),
                    steps=[Updates(rollout_percentage=p) for p in (5, 10, 25, 50, 100)],
                    expires_after=None,
                    on_conflict=OnConflict.FAIL,
                )
        b.cluster.vacuum(db)
        progress(f"agenda: seeded {history:,} applied and {AGENDA_FLAGS * AGENDA_STEPS:,} open")
        b.cluster.quiesce()
        env = environment(b.cluster.url_for(db))
        html = b.workdir / "agenda.html"
        commands = {
            "list": flagsched_command("list", "--limit", "1000"),
            "agenda --html": flagsched_command("agenda", "--html", str(html)),
        }
        timings: dict[str, list[float]] = {name: [] for name in commands}
        for i in range(rounds + 1):
            for name, argv in commands.items():
                ran = run(argv, env, b.log(f"agenda-{i}"))
                if ran.code != 0:
                    raise RuntimeError(f"{name} exited {ran.code}: {ran.log_lines()[-3:]}")
                if i:  # the first round warms the caches
                    timings[name].append(ran.seconds)
        # In-process, to show where the time goes.
        inside: dict[str, list[float]] = {"list": [], "read": [], "project": [], "render": []}
        for _ in range(rounds):
            started = time.perf_counter()
            with begin(database) as conn:
                listed = repository.list_schedules(conn, limit=1000)
            inside["list"].append(time.perf_counter() - started)
            started = time.perf_counter()
            seen = operators.outlook(database, until=None, span=timedelta(days=7), with_failed=True)
            inside["read"].append(time.perf_counter() - started)
            started = time.perf_counter()
            steps = projection.agenda(seen.flags, start=seen.start)
            inside["project"].append(time.perf_counter() - started)
            started = time.perf_counter()
            page.render(seen, steps, zone=None)
            inside["render"].append(time.perf_counter() - started)
        if len(listed) != AGENDA_FLAGS * AGENDA_STEPS or len(steps) != len(listed):
            raise RuntimeError(f"list showed {len(listed)}, agenda {len(steps)} changes")
    finally:
        b.cluster.drop(db)
    medians = {name: _median(t) for name, t in timings.items()}
    case.figures += [
        Figure(
            f"`{name}`, {AGENDA_FLAGS * AGENDA_STEPS:,} open beside {history:,} applied",
            f"median {medians[name] * 1000:.0f} ms",
        )
        for name in commands
    ]
    case.figures.append(
        _ratio_figure(
            "agenda --html (7 days) / list", medians["agenda --html"] / medians["list"], 2
        )
    )
    case.details += [
        f"Each command a new process (the console script), {rounds} times each, alternating, "
        f"after one warm-up round; {AGENDA_FLAGS} flags with one 5-step ramp each (steps a day "
        f"apart, all within the 7-day window) beside {history:,} applied schedules. `list` "
        "prints the same 1,000 open schedules (`--limit 1000`).",
        "",
        "In-process medians (ms): "
        + ", ".join(f"{k} {_median(v) * 1000:.1f}" for k, v in inside.items())
        + " (`list`: repository.list_schedules; read: operators.outlook, the three index reads "
        "and the projection; project: the agenda's ordering; render: the page).",
        "",
        "Its reads are index scans of the open rows only (idx_schedules_open, "
        "idx_schedules_flag_open), checked with EXPLAIN by tests/integration/test_ahead_reads.py.",
    ]
    return case


# -- 12. Drain on your own flags table -----------------------------------------------------

OWN_TEMPLATE = "flagsched_bench_own"
UPSTREAM_SCHEMA = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "upstream-schema.sql"
FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
OWN_CONFIG = (FIXTURES / "upstream-flags.toml").read_text()


def _upstream_template(b: Bench, name: str, config: Path) -> None:
    """Database `name`: the first application's tables exactly (flags of two environments,
    uuid ids, the tables referencing flags), its flags, flagsched migrated onto them with
    `config` (for production)."""
    b.cluster.admin(f"CREATE DATABASE {name}")
    url = b.cluster.url_for(name)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(UPSTREAM_SCHEMA.read_text())
        conn.execute(statement("bench_upstream_flags"), {"flags": DRAIN_FLAGS})
    migrated = run(
        flagsched_command("--config", str(config), "migrate"), environment(url), b.log(name)
    )
    assert migrated.code == 0, migrated.log_lines()[-3:]


def _seeded_upstream(
    b: Bench, name: str, config: Path, *steps: tuple[str, dict[str, Any] | None]
) -> None:
    """`_upstream_template` `name`, then each named statement of `steps` with its
    parameters, in order, and the database vacuumed and analyzed."""
    _upstream_template(b, name, config)
    for step, params in steps:
        b.cluster.sql(name, statement(step), params)
    b.cluster.vacuum(name)


def _prepare_own_template(b: Bench, config: Path) -> None:
    """The first application's flags table (uuid ids, the flags of two environments, a
    zone-less updated_at, the overrides table referencing flags), flagsched migrated beside
    it for production, and the same 30,000 due schedules as case 1's in flagsched's own
    schedules table, all of production."""
    _seeded_upstream(
        b,
        OWN_TEMPLATE,
        config,
        ("bench_own_schedules", {"flags": DRAIN_FLAGS, "count": DRAIN_SCHEDULES}),
    )


def _drains_beside_built_in(
    b: Bench, config: Path, templates: dict[str, str], statuses: str, label: str, runs: int
) -> tuple[dict[str, list[float]], list[str]]:
    """`runs` drains of case 1's backlog on the built-in tables and, with `config`, on a fresh
    copy of each of `templates` (kind -> template database), interleaved AB / BA: the times
    by kind ("built-in" and the templates' kinds), and what went wrong (not every schedule
    applied, counted by the named statement `statuses`, or an exit other than 0)."""
    kinds = ["built-in", *templates]
    times: dict[str, list[float]] = {k: [] for k in kinds}
    problems: list[str] = []
    for i in range(runs):
        for kind in kinds if i % 2 == 0 else kinds[::-1]:
            if kind == "built-in":
                ran, db = _drain_once(b, "flagsched", f"{label}-drain-{kind}-{i}")
                found = b.cluster.statuses(db)
            else:
                db = b.cluster.clone(templates[kind])
                b.cluster.quiesce()
                argv = flagsched_command("--config", str(config), "process", *DRAIN_ARGS)
                ran = run(argv, environment(b.cluster.url_for(db)), b.log(f"{kind}-drain-{i}"))
                found = dict(b.cluster.rows(db, statement(statuses)))
            b.cluster.drop(db)
            if ran.code != 0 or found != {"applied": DRAIN_SCHEDULES}:
                problems.append(f"{kind} run {i}: exit {ran.code}, {found}")
            times[kind].append(ran.seconds)
            progress(f"{label}-table drain {kind} run {i + 1}/{runs}: {ran.seconds:.2f} s")
    return times, problems


def own_flags_drain(b: Bench) -> Case:
    case = Case("12. Drain on your own flags table")
    config = b.workdir / "own.toml"
    config.write_text(OWN_CONFIG)
    _prepare_own_template(b, config)
    runs = b.runs(7)
    times, problems = _drains_beside_built_in(
        b, config, {"own": OWN_TEMPLATE}, "bench_own_statuses", "own", runs
    )
    built_in, own = _median(times["built-in"]), _median(times["own"])
    case.figures += [
        Figure("built-in tables drain, median", f"{built_in:.2f} s"),
        Figure("your own flags table drain, median", f"{own:.2f} s"),
        _ratio_figure("own / built-in", own / built_in, 1.2),
        Figure("every schedule applied once", "yes" if not problems else "NO", "yes", not problems),
    ]
    case.details += [
        f"Case 1's drain ({DRAIN_SCHEDULES:,} due schedules over {DRAIN_FLAGS:,} flags, "
        f"`flagsched process {' '.join(DRAIN_ARGS)}`) on the built-in tables, and the same "
        "schedules in flagsched's own schedules table beside the first application's flags "
        "table (tests/fixtures/upstream-schema.sql: uuid ids, the flags of two environments, "
        f"{2 * DRAIN_FLAGS:,} rows, the production deployment's scope), {runs} runs each in "
        "AB / BA order, each a whole process on a fresh copy.",
        "",
        "| run | built-in s | own s |",
        "|---|---|---|",
        *(f"| {i + 1} | {times['built-in'][i]:.2f} | {times['own'][i]:.2f} |" for i in range(runs)),
    ]
    case.details += [""] + [f"- problem: {p}" for p in problems]
    return case


# -- 13. Drain on the first application's schedules table --------------------------------

APP_TEMPLATE = "flagsched_bench_app"
APP_CONFIG = OWN_CONFIG + (FIXTURES / "upstream-schedules.toml").read_text()


def _prepare_app_template(b: Bench, config: Path) -> None:
    """The first application's tables exactly (flags of two environments, its schedules
    table with uuid ids and foreign keys), flagsched migrated onto them for production, and
    case 1's 30,000 due schedules written by the application into its own schedules table."""
    _seeded_upstream(
        b,
        APP_TEMPLATE,
        config,
        ("bench_upstream_schedules", {"flags": DRAIN_FLAGS, "count": DRAIN_SCHEDULES}),
    )
    b.cluster.admin(f"CREATE DATABASE {APP_INDEXED} TEMPLATE {APP_TEMPLATE}")
    b.cluster.sql(APP_INDEXED, statement("bench_upstream_open_indexes"))
    b.cluster.vacuum(APP_INDEXED)


APP_INDEXED = "flagsched_bench_app_indexed"


def app_schedules_drain(b: Bench) -> Case:
    case = Case("13. Drain on the first application's schedules table")
    config = b.workdir / "app.toml"
    config.write_text(APP_CONFIG)
    _prepare_app_template(b, config)
    runs = b.runs(7)
    times, problems = _drains_beside_built_in(
        b, config, {"app": APP_TEMPLATE, "indexed": APP_INDEXED}, "bench_upstream_statuses",
        "app", runs,
    )  # fmt: skip
    built_in, app = _median(times["built-in"]), _median(times["app"])
    indexed = _median(times["indexed"])
    case.figures += [
        Figure("built-in tables drain, median", f"{built_in:.2f} s"),
        Figure("the application's schedules table drain, median", f"{app:.2f} s"),
        _ratio_figure("application's tables / built-in", app / built_in, 1.2),
        Figure("with the two partial indexes the application may add, median", f"{indexed:.2f} s"),
        Figure("those / built-in", f"{indexed / built_in:.2f}x"),
        Figure("every schedule applied once", "yes" if not problems else "NO", "yes", not problems),
    ]
    case.details += [
        f"Case 1's drain ({DRAIN_SCHEDULES:,} due schedules over {DRAIN_FLAGS:,} flags, "
        f"`flagsched process {' '.join(DRAIN_ARGS)}`) on the built-in tables, and the same "
        "schedules written by the first application into its own schedules table "
        "(tests/fixtures/upstream-schema.sql exactly: uuid ids, `flag_id` with a foreign key, "
        "camelCase `updates`, the flags of two environments, only its own indexes), which "
        "flagsched reads and writes through its view, for the production deployment; "
        f"{runs} runs each in AB / BA order, each a whole process on a fresh copy.",
        "",
        "The third column: the same on a copy of the application's tables to which the "
        "application added the built-in tables' two partial indexes of open rows "
        "(`(scheduled_at, id) WHERE status = 'pending'` and `(flag_id, scheduled_at, id) "
        "WHERE status IN ('pending', 'failed')`); flagsched never adds an index there.",
        "",
        "| run | built-in s | application's s | with its two indexes s |",
        "|---|---|---|---|",
        *(
            f"| {i + 1} | {times['built-in'][i]:.2f} | {times['app'][i]:.2f} "
            f"| {times['indexed'][i]:.2f} |"
            for i in range(runs)
        ),
    ]
    case.details += [""] + [f"- problem: {p}" for p in problems]
    return case


# -- 14. Deep backlogs on the first application's schedules table ------------------------

DEEP_TEMPLATE = "flagsched_bench_deep"
DEEP_FLAGS, DEEP_APPLIED, DEEP_DUE = 300, 20, 100


RESTORED_TEMPLATE = "flagsched_bench_restored"
RESTORED = 2 * DRAIN_SCHEDULES

RUNS_TEMPLATE = "flagsched_bench_runs"
RUNS_FLAGS, RUNS_APPLIED, RUNS_DUE = 200, 150, 150

UNINDEXED_TEMPLATE = "flagsched_bench_unindexed"
UNINDEXED_FLAGS, UNINDEXED_DUE = 1_000, 10_000

Judge = Callable[[Ran, str], str | None]  # a run and its copy's database -> what went wrong


def _on_fresh_copies(
    b: Bench, template: str, argv: list[str], runs: int, label: str, judge: Judge
) -> tuple[list[float], list[str]]:
    """`argv` on a fresh copy of `template` each of `runs` runs: the times, and what `judge`
    found wrong in each (before the copy is dropped)."""
    times: list[float] = []
    problems: list[str] = []
    for i in range(b.runs(runs)):
        db = b.cluster.clone(template)
        b.cluster.quiesce()
        ran = run(argv, environment(b.cluster.url_for(db)), b.log(f"{label}-{i}"))
        problem = judge(ran, db)
        b.cluster.drop(db)
        if problem is not None:
            problems.append(f"{label} run {i}: {problem}")
        times.append(ran.seconds)
        progress(f"{label} run {i + 1}: {ran.seconds:.2f} s")
    return times, problems


def _applied_in_tick(count: int) -> Judge:
    """A tick that exits 0 having applied `count` schedules."""

    def judge(ran: Ran, db: str) -> str | None:
        finished = _json_events(ran, "tick_finished")
        applied = finished[-1]["applied"] if finished else None
        return None if ran.code == 0 and applied == count else f"exit {ran.code}, applied {applied}"

    return judge


def _runs_tick(b: Bench, config: Path) -> tuple[list[float], list[str]]:
    """One tick of three batches on a deep due backlog of few flags, each flag's schedules in
    one run of time (the first application's tables, its indexes): times, what went wrong."""
    _seeded_upstream(
        b,
        RUNS_TEMPLATE,
        config,
        ("bench_upstream_runs", {"flags": RUNS_FLAGS, "applied": RUNS_APPLIED, "due": RUNS_DUE}),
    )
    argv = flagsched_command(
        "--config", str(config), "process", "--batch-size", "100", "--max-batches", "3"
    )
    return _on_fresh_copies(b, RUNS_TEMPLATE, argv, 5, "runs of few flags", _applied_in_tick(300))


def _unindexed_drain(b: Bench, config: Path) -> tuple[list[float], list[str]]:
    """A drain on the first application's tables without its indexes on `flag_id` and
    `scheduled_at`: its times (a fresh copy each run) and what went wrong."""
    _seeded_upstream(
        b,
        UNINDEXED_TEMPLATE,
        config,
        ("bench_upstream_drop_claim_indexes", None),
        ("bench_upstream_schedules", {"flags": UNINDEXED_FLAGS, "count": UNINDEXED_DUE}),
    )
    argv = flagsched_command("--config", str(config), "process", *DRAIN_ARGS)

    def drained(ran: Ran, db: str) -> str | None:
        found = dict(b.cluster.rows(db, statement("bench_upstream_statuses")))
        return (
            None
            if ran.code == 0 and found == {"applied": UNINDEXED_DUE}
            else (f"exit {ran.code}, {found}")
        )

    return _on_fresh_copies(b, UNINDEXED_TEMPLATE, argv, 3, "drain without the indexes", drained)


def _restored_tick(b: Bench, config: Path) -> tuple[list[float], list[str]]:
    """The first tick after a restore left `RESTORED` due rows no trigger noted: its times
    (a fresh copy each run) and what went wrong (an exit other than 0, a batch not applied)."""
    _seeded_upstream(
        b,
        RESTORED_TEMPLATE,
        config,
        ("bench_upstream_noting_off", None),
        ("bench_upstream_schedules", {"flags": DRAIN_FLAGS, "count": RESTORED}),
        ("bench_upstream_noting_on", None),
    )
    argv = flagsched_command("--config", str(config), "process", "--batch-size", "100")
    return _on_fresh_copies(
        b, RESTORED_TEMPLATE, argv, 5, "restore's first tick", _applied_in_tick(100)
    )


def deep_backlog(b: Bench) -> Case:
    case = Case("14. Deep backlogs on the first application's schedules table")
    config = b.workdir / "app.toml"
    config.write_text(APP_CONFIG)
    _seeded_upstream(
        b,
        DEEP_TEMPLATE,
        config,
        (
            "bench_upstream_deep_backlog",
            {"flags": DEEP_FLAGS, "applied": DEEP_APPLIED, "due": DEEP_DUE},
        ),
    )
    argv = flagsched_command("--config", str(config), "process", *DRAIN_ARGS)
    times: list[float] = []
    problems: list[str] = []
    for i in range(b.runs(5)):
        ran = run(argv, environment(b.cluster.url_for(DEEP_TEMPLATE)), b.log(f"deep-{i}"))
        finished = _json_events(ran, "tick_finished")
        held = finished[-1]["held_back"] if finished else None
        if ran.code != 0 or held != 100:  # a batch's worth, nothing applied
            problems.append(f"run {i}: exit {ran.code}, held back {held}")
        times.append(ran.seconds)
        progress(f"deep backlog tick run {i + 1}: {ran.seconds:.2f} s")
    tick = _median(times)
    restored, restore_problems = _restored_tick(b, config)
    problems += restore_problems
    first = _median(restored)
    runs_times, runs_problems = _runs_tick(b, config)
    problems += runs_problems
    few = _median(runs_times)
    unindexed, unindexed_problems = _unindexed_drain(b, config)
    problems += unindexed_problems
    bare = _median(unindexed)
    case.figures += [
        Figure("one tick, median", f"{tick:.2f} s", "<= 3 s", tick <= 3.0),
        Figure("a restore's first tick, median", f"{first:.2f} s", "<= 3 s", first <= 3.0),
        Figure("a tick of 3 batches, due runs of few flags, median", f"{few:.2f} s", "<= 3 s",
               few <= 3.0),
        Figure("a drain without its flag_id and scheduled_at indexes, median", f"{bare:.2f} s"),
        Figure("that drain, per claim of 100", f"{bare / (UNINDEXED_DUE / 100):.3f} s"),
        Figure("every tick exits 0 as expected", "yes" if not problems else "NO", "yes",
               not problems),
    ]  # fmt: skip
    case.details += [
        f"The first application's tables (tests/fixtures/upstream-schema.sql exactly, its own "
        f"indexes only): on each of {DEEP_FLAGS} production flags {DEEP_APPLIED} applied "
        f"schedules, one whose retry waits an hour, and {DEEP_DUE} due ones behind it, all "
        f"held back by the flag's order. `flagsched process {' '.join(DRAIN_ARGS)}` on the "
        "same database each run (it changes nothing: every due row is held back). The target "
        "is a tenth of the default statement timeout (30 s), which the claim before the "
        "map of flags held by a schedule that cannot move (stored/claim_guard.sql) passed: "
        "every tick exited 3. Runs: " + ", ".join(f"{t:.2f} s" for t in times) + ".",
        "",
        f"A restore: the first application's tables with {RESTORED:,} due schedules (case 1's "
        f"backlog, twice over) inserted while flagsched's trigger on its schedules table was "
        "off (as a restore with triggers disabled leaves them), none noted, the database "
        "vacuumed and analyzed (flagsched's state table empty); the first "
        "`flagsched process --batch-size 100` on a fresh copy each run notes them all, then "
        "applies a batch. The previous release's noting (`flagsched_note_unseen_v1`) read "
        "the state table it was filling once per row there: that tick passed the statement "
        "timeout. Runs: " + ", ".join(f"{t:.2f} s" for t in restored) + ".",
        "",
        f"Runs of few flags: the first application's tables (its indexes), on each of "
        f"{RUNS_FLAGS} production flags {RUNS_APPLIED} applied schedules then {RUNS_DUE} due "
        "ones, each flag's in one run of time, the flags one after another (in "
        "scheduled_at order 149 held-back rows follow each flag's first); one "
        "`flagsched process --batch-size 100 --max-batches 3` on a fresh copy each run. The "
        "claim sees that the newest due rows are of few flags and maps each flag's first "
        "open schedules in one pass (stored/claim_guard.sql `few_leaders`): the probes "
        "walked every held-back row behind each flag's first, past the statement timeout "
        "(every tick exit 3, found by the adversarial pass of 2026-12-07). Runs: "
        + ", ".join(f"{t:.2f} s" for t in runs_times)
        + ".",
        "",
        f"Without the indexes: the first application's tables without `idx_schedules_flag_id` "
        f"and `idx_schedules_scheduled_at`, {UNINDEXED_DUE:,} due schedules over "
        f"{UNINDEXED_FLAGS:,} production flags written as case 13 writes them; "
        f"`flagsched process {' '.join(DRAIN_ARGS)}` on a fresh copy each run. There the "
        "claim reads each flag's first open schedules in one pass over the open rows "
        "(stored/claim_guard.sql `firsts_map`), where a probe of the table per due row made "
        "each claim read the table once per due row. No target: a figure to compare with "
        "case 13 (the same schedules table with its indexes). Runs: "
        + ", ".join(f"{t:.2f} s" for t in unindexed)
        + ".",
    ]
    case.details += [""] + [f"- problem: {p}" for p in problems]
    return case


CASES: list[Callable[[Bench], Case]] = [
    drain_throughput,
    claim_vs_history,
    cold_start,
    failure_path,
    overlap,
    memory,
    hostile_memory,
    list_vs_history,
    settings_cost,
    migrate_under_load,
    agenda_vs_list,
    own_flags_drain,
    app_schedules_drain,
    deep_backlog,
]
