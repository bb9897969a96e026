"""Four eyes (issue 20): approvals for risky scheduled changes, on the built-in tables.

Everything here is new and small, so it ports to the templated stored logic on its own:

- feature_flag_schedules.needs_approval (boolean, default false): `--approval` asked for a
  second person; created_by (text): the login (session_user) that inserted the row, set by
  the BEFORE INSERT trigger flagsched_note_creator_v1 whatever the INSERT said (so also for
  rows applications insert; a schedule made from a recurrence gets the recurrence's creator);
  awaiting_approval_since (timestamptz): set by a tick, under the flag's lock, the first time
  it found the schedule due and needing an approval it has not got; cleared by `approve`.
- feature_flag_recurrences.needs_approval, created_by: the same for recurrences (each
  schedule made from one needs approval when it does).
- feature_flag_approvals: the record of verdicts (approved / rejected), who (session_user,
  set by the trigger flagsched_check_approval_v1, never by the caller), when, and the note.
  The same trigger refuses an approval by the login that created the schedule: four eyes
  hold against a psql session too, not only against `flagsched approve`.
- flagsched_claim_v3(limit, lock, max_lateness) and flagsched_held_back_v2(limit,
  max_lateness): 0006's flagsched_claim_v2 and flagsched_held_back_v1, with one rule added
  (every change marked `-- approval (0008)`): an open schedule awaiting approval is never
  due (never takes a place in a batch, and holds its flag's later schedules back, like a
  retry waiting for a later time) until it is past its lateness (expires_at, or the maximum
  lateness): then it is claimed like any due row so the tick can fail it for good as
  `expired:`. The claim also returns, per row, `awaiting`, `needs_approval` and `approved`
  (an approved verdict exists). The rule is one SQL fragment, `_awaiting_stuck(e)` below.
  The old functions stay for the previous release.

Revision ID: 0008
Revises: 0007
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

CLAIM_FUNCTION = "flagsched_claim_v3(integer, boolean, interval)"
HELD_FUNCTION = "flagsched_held_back_v2(integer, interval)"
CREATOR_FUNCTION = "flagsched_note_creator_v1"
RECURRENCE_CREATOR_FUNCTION = "flagsched_note_recurrence_creator_v1"
APPROVAL_FUNCTION = "flagsched_check_approval_v1"

_MIN, _MAX = "'0001-01-01 00:00:00+00'", "'9999-12-31 23:59:59.999999+00'"
_COLS = (
    "id, flag_key, scheduled_at, updates, status, retry_count, max_retries, next_retry_at,"
    " attempts, awaiting_approval_since, needs_approval"  # approval (0008): two columns
)
_S_COLS = ", ".join("s." + c for c in _COLS.split(", "))


def _awaiting_stuck(e: str) -> str:
    """approval (0008), the one new rule: open schedule `e` is awaiting approval and not yet
    past its lateness, so it cannot move (lateness exactly as flagsched_check_v2 decides
    `expired`: expires_at, else its due time (scheduled_at or last retry) more than
    p_max_lateness ago)."""
    return (
        f"({e}.awaiting_approval_since IS NOT NULL"
        f" AND NOT coalesce({e}.expires_at < now(), false)"
        f" AND NOT coalesce({e}.expires_at IS NULL AND greatest({e}.scheduled_at,"
        f" CASE WHEN {e}.reviewed_at <= now() THEN {e}.reviewed_at END)"
        " < now() - p_max_lateness, false))"
    )


def _clamped(column: str) -> str:
    return (
        f"CASE WHEN {column} < TIMESTAMPTZ {_MIN} THEN TIMESTAMPTZ {_MIN}"
        f" WHEN {column} > TIMESTAMPTZ {_MAX} THEN TIMESTAMPTZ {_MAX} ELSE {column} END"
    )


def _defect(column: str, when: str = "true") -> str:
    return (
        f"WHEN {when} AND NOT (c.{column} BETWEEN TIMESTAMPTZ {_MIN} AND TIMESTAMPTZ {_MAX})"
        f" THEN '{column} ' || CAST(c.{column} AS text)"
        " || ' is outside the years 1..9999 flagsched can read'"
    )


def _open(e: str) -> str:
    """SQL: schedule `e` is open (pending, or failed and waiting for a retry)."""
    return (
        f"{e}.status IN ('pending', 'failed') AND ({e}.status = 'pending' OR "
        f"({e}.next_retry_at IS NOT NULL AND {e}.retry_count <= {e}.max_retries))"
    )


def _due(e: str) -> str:
    """SQL: open schedule `e` is due now (approval (0008): and not stuck awaiting one)."""
    return (
        f"(CASE WHEN {e}.status = 'pending' THEN {e}.scheduled_at <= now()"
        f" ELSE {e}.next_retry_at <= now() OR {e}.next_retry_at > TIMESTAMPTZ {_MAX} END"
        f" AND NOT {_awaiting_stuck(e)})"
    )


def _earlier_open(s: str, *, unless: str) -> str:
    return f"""EXISTS (
            SELECT 1 FROM feature_flag_schedules e
            WHERE e.flag_key = {s}.flag_key AND e.status IN ('pending', 'failed')
              AND (e.scheduled_at, e.id) < ({s}.scheduled_at, {s}.id)
              AND {_open("e")} AND NOT ({unless})
            OFFSET 0)"""


def claim_query(*, lock: bool, limit: str = "p_limit") -> str:
    """0006's claim_query, with the approval (0008) lines marked."""
    skip = "FOR NO KEY UPDATE SKIP LOCKED" if lock else ""
    skip_s = skip.replace("UPDATE", "UPDATE OF s")
    return f"""
    WITH untimed AS (  -- waiting for a retry after year 9999: it can never be timed
        SELECT {_COLS} FROM feature_flag_schedules
        WHERE status = 'failed' AND next_retry_at > TIMESTAMPTZ {_MAX}
          AND retry_count <= max_retries
        ORDER BY next_retry_at, id
        LIMIT {limit}
        {skip}
    ), retries AS (  -- due retries that lead their flag
        SELECT {_S_COLS} FROM feature_flag_schedules s
        WHERE s.status = 'failed' AND s.next_retry_at <= now()
          AND s.retry_count <= s.max_retries
          AND NOT {_awaiting_stuck("s")}  -- approval (0008)
          AND NOT {_earlier_open("s", unless="false")}
        ORDER BY s.next_retry_at, s.id
        LIMIT {limit} - (SELECT count(*) FROM untimed)
        {skip_s}
    ), leaders AS (  -- due pending schedules first in their flag: one place per flag first
        SELECT {_S_COLS} FROM feature_flag_schedules s
        WHERE s.status = 'pending' AND s.scheduled_at <= now()
          AND NOT {_awaiting_stuck("s")}  -- approval (0008)
          AND NOT {_earlier_open("s", unless="false")}
        ORDER BY s.scheduled_at, s.id
        LIMIT {limit} - (SELECT count(*) FROM untimed) - (SELECT count(*) FROM retries)
        {skip_s}
    ), behind_ids AS (  -- due schedules behind due ones of their flag, pending and retries
        SELECT u.id FROM (
            (SELECT s.id, s.scheduled_at FROM feature_flag_schedules s
             WHERE s.status = 'pending' AND s.scheduled_at <= now()
               AND s.id NOT IN (SELECT id FROM leaders)
               AND NOT {_awaiting_stuck("s")}  -- approval (0008)
               AND NOT {_earlier_open("s", unless=_due("e"))}
             ORDER BY s.scheduled_at, s.id
             LIMIT {limit} - (SELECT count(*) FROM untimed) - (SELECT count(*) FROM retries)
              - (SELECT count(*) FROM leaders))
            UNION ALL
            (SELECT s.id, s.scheduled_at FROM feature_flag_schedules s
             WHERE s.status = 'failed' AND s.next_retry_at <= now()
               AND s.retry_count <= s.max_retries
               AND s.id NOT IN (SELECT id FROM retries)
               AND NOT {_awaiting_stuck("s")}  -- approval (0008)
               AND NOT {_earlier_open("s", unless=_due("e"))}
             ORDER BY s.scheduled_at, s.id
             LIMIT {limit} - (SELECT count(*) FROM untimed) - (SELECT count(*) FROM retries)
              - (SELECT count(*) FROM leaders))
        ) u
        ORDER BY u.scheduled_at, u.id
        LIMIT {limit} - (SELECT count(*) FROM untimed) - (SELECT count(*) FROM retries)
              - (SELECT count(*) FROM leaders)
    ), behind AS (  -- locked here, re-checked on the row's latest version
        SELECT {_S_COLS} FROM feature_flag_schedules s
        WHERE s.id IN (SELECT id FROM behind_ids)
          AND CASE WHEN s.status = 'pending' THEN s.scheduled_at <= now()
                   ELSE s.status = 'failed' AND s.next_retry_at <= now()
                        AND s.retry_count <= s.max_retries END
          AND NOT {_awaiting_stuck("s")}  -- approval (0008)
        {skip_s}
    ), claimed AS (
        SELECT * FROM untimed UNION ALL SELECT * FROM retries UNION ALL SELECT * FROM leaders
        UNION ALL SELECT * FROM behind
    )
    SELECT now(), c.id, c.flag_key, {_clamped("c.scheduled_at")},
           CASE WHEN z.size <= 8192 THEN c.updates END,
           c.status, c.retry_count, c.max_retries, {_clamped("c.next_retry_at")},
           b.blocked,
           CASE {_defect("scheduled_at")}
                {_defect("next_retry_at", when="c.status = 'failed'")}
                WHEN z.size > 8192 THEN 'updates is ' || z.size
                     || ' bytes, more than the 8192 flagsched reads'
           END,
           {_attempts_made("c.attempts")},
           -- approval (0008): what the tick judges approval by
           c.awaiting_approval_since IS NOT NULL, c.needs_approval,
           EXISTS (SELECT 1 FROM feature_flag_approvals a
                   WHERE a.schedule_id = c.id AND a.verdict = 'approved')
    FROM claimed c
    CROSS JOIN LATERAL (SELECT octet_length(CAST(c.updates AS text)) AS size) z
    CROSS JOIN LATERAL (
        SELECT {_earlier_open("c", unless="e.id IN (SELECT id FROM claimed)")} AS blocked
    ) b
    ORDER BY c.flag_key, c.scheduled_at, c.id
    """


def _attempts_made(column: str) -> str:
    kept = f"flagsched_kept_attempts_v2({column})"
    last = "(k.kept -> -1 -> 'attempt')"
    return f"""(SELECT CASE WHEN jsonb_typeof({last}) = 'number'
                            AND CAST({last} AS numeric) BETWEEN 0 AND 1000000000
                       THEN greatest(jsonb_array_length(k.kept),
                                     CAST(CAST({last} AS numeric) AS integer))
                       ELSE jsonb_array_length(k.kept) END
                FROM (SELECT {kept} AS kept OFFSET 0) k)"""


def held_back_query() -> str:
    """0006's held_back_query, with the approval (0008) lines marked: also the schedules
    behind one awaiting approval (never the awaiting one itself)."""
    return f"""
    SELECT s.id, s.flag_key, {_clamped("s.scheduled_at")}, s.status, s.retry_count,
           s.max_retries
    FROM feature_flag_schedules s
    WHERE s.flag_key IN (
            SELECT w.flag_key FROM feature_flag_schedules w
            WHERE w.status = 'failed' AND w.next_retry_at > now()
              AND w.next_retry_at <= TIMESTAMPTZ {_MAX} AND w.retry_count <= w.max_retries
            UNION ALL  -- approval (0008): awaiting rows are due (marked so when due), found
            -- by the due indexes (idx_schedules_pending_due, idx_schedules_next_retry_at)
            SELECT w.flag_key FROM feature_flag_schedules w
            WHERE w.status = 'pending' AND w.scheduled_at <= now()
              AND w.awaiting_approval_since IS NOT NULL
            UNION ALL
            SELECT w.flag_key FROM feature_flag_schedules w
            WHERE w.status = 'failed' AND w.next_retry_at <= now()
              AND w.retry_count <= w.max_retries AND w.awaiting_approval_since IS NOT NULL)
      AND s.status IN ('pending', 'failed') AND {_open("s")} AND ({_due("s")})
      AND {_earlier_open("s", unless=_due("e"))}
    ORDER BY s.flag_key, s.scheduled_at, s.id
    LIMIT p_limit
    """


def upgrade() -> None:
    # Constant defaults and NULLs: no table rewrite.
    op.execute(
        "ALTER TABLE feature_flag_schedules"
        " ADD COLUMN needs_approval boolean NOT NULL DEFAULT false,"
        " ADD COLUMN created_by text NULL,"
        " ADD COLUMN awaiting_approval_since timestamptz NULL"
    )
    op.execute(
        "ALTER TABLE feature_flag_recurrences"
        " ADD COLUMN needs_approval boolean NOT NULL DEFAULT false,"
        " ADD COLUMN created_by text NULL"
    )
    op.execute(
        """
        CREATE TABLE feature_flag_approvals (
            id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            -- no foreign key: applications may TRUNCATE or rewrite their schedules as before
            -- (prune deletes a schedule's verdicts with it)
            schedule_id bigint NOT NULL,
            verdict text NOT NULL CONSTRAINT verdict_check
                CHECK (verdict IN ('approved', 'rejected')),
            decided_by text NOT NULL,
            decided_at timestamptz NOT NULL DEFAULT now(),
            note text NULL
        )
        """
    )
    op.execute("CREATE INDEX idx_approvals_schedule ON feature_flag_approvals (schedule_id, id)")
    op.execute(
        f"""
        CREATE FUNCTION {RECURRENCE_CREATOR_FUNCTION}() RETURNS trigger
        LANGUAGE plpgsql SECURITY INVOKER AS $$
        -- The login that inserted the recurrence, whatever the INSERT said.
        BEGIN
            NEW.created_by := session_user;
            RETURN NEW;
        END
        $$
        """
    )
    op.execute(
        f"""
        CREATE FUNCTION {CREATOR_FUNCTION}() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
        -- The login that inserted the schedule (session_user: a SET ROLE does not change
        -- who is at the keyboard), whatever the INSERT said; a schedule a tick made from a
        -- recurrence is the recurrence creator's, and needs approval when it does (the
        -- owner's rights: the inserting role need not read recurrences).
        DECLARE
            creator text;
            approval boolean;
        BEGIN
            NEW.created_by := session_user;
            IF NEW.recurrence_id IS NOT NULL THEN
                SELECT r.created_by, r.needs_approval INTO creator, approval
                FROM feature_flag_recurrences r WHERE r.id = NEW.recurrence_id;
                IF FOUND THEN
                    NEW.created_by := coalesce(creator, NEW.created_by);
                    NEW.needs_approval := NEW.needs_approval OR approval;
                END IF;
            END IF;
            NEW.awaiting_approval_since := NULL;
            RETURN NEW;
        END
        $$
        """
    )
    op.execute(
        f"""
        CREATE FUNCTION {APPROVAL_FUNCTION}() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
        -- A verdict is the login's own (session_user), now; nobody approves a schedule
        -- they created (four eyes), however the row is inserted.
        BEGIN
            NEW.decided_by := session_user;
            NEW.decided_at := now();
            IF NEW.verdict = 'approved' AND EXISTS (
                SELECT 1 FROM feature_flag_schedules s
                WHERE s.id = NEW.schedule_id AND s.created_by = session_user) THEN
                RAISE EXCEPTION 'four eyes: % created schedule %, so % cannot approve it',
                    session_user, NEW.schedule_id, session_user
                    USING ERRCODE = 'check_violation';
            END IF;
            RETURN NEW;
        END
        $$
        """
    )
    op.execute(
        f"""
        CREATE TRIGGER flagsched_note_creator BEFORE INSERT ON feature_flag_schedules
        FOR EACH ROW EXECUTE FUNCTION {CREATOR_FUNCTION}()
        """
    )
    op.execute(
        f"""
        CREATE TRIGGER flagsched_note_creator BEFORE INSERT ON feature_flag_recurrences
        FOR EACH ROW EXECUTE FUNCTION {RECURRENCE_CREATOR_FUNCTION}()
        """
    )
    op.execute(
        f"""
        CREATE TRIGGER flagsched_check_approval BEFORE INSERT ON feature_flag_approvals
        FOR EACH ROW EXECUTE FUNCTION {APPROVAL_FUNCTION}()
        """
    )
    op.execute(
        f"""
        CREATE FUNCTION flagsched_claim_v3(p_limit integer, p_lock boolean,
                                           p_max_lateness interval)
        RETURNS TABLE (now timestamptz, id bigint, flag_key text, scheduled_at timestamptz,
                       updates jsonb, status text, retry_count integer, max_retries integer,
                       next_retry_at timestamptz, blocked boolean, defect text,
                       attempts_made integer, awaiting boolean, needs_approval boolean,
                       approved boolean)
        LANGUAGE plpgsql SECURITY INVOKER SET jit = off AS $$
        #variable_conflict use_column
        BEGIN
            IF p_lock THEN
                RETURN QUERY {claim_query(lock=True)};
            ELSE
                RETURN QUERY {claim_query(lock=False)};
            END IF;
        END
        $$
        """
    )
    op.execute(
        f"""
        CREATE FUNCTION flagsched_held_back_v2(p_limit integer, p_max_lateness interval)
        RETURNS TABLE (id bigint, flag_key text, scheduled_at timestamptz, status text,
                       retry_count integer, max_retries integer)
        LANGUAGE plpgsql STABLE SECURITY INVOKER SET jit = off AS $$
        #variable_conflict use_column
        BEGIN
            RETURN QUERY {held_back_query()};
        END
        $$
        """
    )


def downgrade() -> None:
    op.execute(f"DROP FUNCTION {HELD_FUNCTION}")
    op.execute(f"DROP FUNCTION {CLAIM_FUNCTION}")
    op.execute("DROP TABLE feature_flag_approvals")
    op.execute(f"DROP FUNCTION {APPROVAL_FUNCTION}()")
    op.execute("DROP TRIGGER flagsched_note_creator ON feature_flag_recurrences")
    op.execute("DROP TRIGGER flagsched_note_creator ON feature_flag_schedules")
    op.execute(f"DROP FUNCTION {RECURRENCE_CREATOR_FUNCTION}()")
    op.execute(f"DROP FUNCTION {CREATOR_FUNCTION}()")
    op.execute(
        "ALTER TABLE feature_flag_recurrences DROP COLUMN needs_approval, DROP COLUMN created_by"
    )
    op.execute(
        "ALTER TABLE feature_flag_schedules DROP COLUMN needs_approval,"
        " DROP COLUMN created_by, DROP COLUMN awaiting_approval_since"
    )
