-- Indexes of flagsched's state table beside an application's schedules table (issue 18,
-- shape 3), idempotent: what the claim's map of flags held by a schedule that cannot move
-- reads (stored/claim_guard.sql `blockers_map`) when the application's table does not
-- index it, those awaiting approval and (where the application's table has no
-- next_retry_at) those waiting for a retry. Both are small (open rows that cannot move),
-- and neither column changes when a change is applied, so the record's updates of the
-- state rows stay HOT. flagsched's own table: the application's table gets no index.
CREATE INDEX IF NOT EXISTS idx_state_awaiting ON {state} (id)
    WHERE awaiting_approval_since IS NOT NULL;
CREATE INDEX IF NOT EXISTS idx_state_waiting ON {state} (next_retry_at)
    WHERE next_retry_at IS NOT NULL
