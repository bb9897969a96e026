"""Four eyes, judged (flagsched/approval.py, pure): exact cases of the policy, and
properties over any policy and any run of changes (hypothesis). Also the projection's
reading of it (plan, agenda): an unapproved change is held and holds its flag back, until it
expires."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from hypothesis import given
from hypothesis import strategies as st

from flagsched.approval import ApprovalPolicy, FlagState, Step, first_awaiting, reason
from flagsched.model import Updates
from flagsched.projection import AWAITING_APPROVAL, Outcome, project
from flagsched.rows import FlagRow
from tests.unit.test_projection import NOW, H, by_key, schedule

OFF = FlagState(False, 0)


def test_each_rule_of_the_policy() -> None:
    assert reason(ApprovalPolicy(), "a", OFF, Updates(enabled=True)) is None
    assert reason(ApprovalPolicy(), "a", OFF, Updates(enabled=True), explicit=True) == (
        "scheduled with --approval"
    )
    globs = ApprovalPolicy(flags=("payments-*", "check[o]ut"))
    assert reason(globs, "payments-eu", OFF, Updates(enabled=False)) is not None
    assert reason(globs, "checkout", None, Updates(enabled=False)) is not None  # no flag yet
    assert reason(globs, "Payments-eu", OFF, Updates(enabled=False)) is None  # case counts
    enabling = ApprovalPolicy(enabling=True)
    assert reason(enabling, "a", OFF, Updates(enabled=True)) == "it switches the flag on"
    assert reason(enabling, "a", FlagState(True, 0), Updates(enabled=True)) is None
    assert reason(enabling, "a", None, Updates(enabled=True)) is None  # fails anyway
    steep = ApprovalPolicy(rollout_increase_over=50)
    assert reason(steep, "a", FlagState(False, 10), Updates(rollout_percentage=60)) is None
    assert reason(steep, "a", FlagState(False, 10), Updates(rollout_percentage=61)) == (
        "it raises the rollout by 51 points, more than 50"
    )
    assert reason(steep, "a", FlagState(False, 90), Updates(rollout_percentage=0)) is None


def test_a_flags_changes_are_judged_one_after_another() -> None:
    steep = ApprovalPolicy(rollout_increase_over=50)
    ramp = [Step(Updates(rollout_percentage=n)) for n in (10, 50, 100)]
    assert first_awaiting(steep, "a", OFF, ramp) is None  # +10, +40, +50
    jump = [Step(Updates(rollout_percentage=n)) for n in (40, 100, 100)]
    assert first_awaiting(steep, "a", OFF, jump) == (
        1,
        "it raises the rollout by 60 points, more than 50",
    )
    approved = [jump[0], replace(jump[1], approved=True), jump[2]]
    assert first_awaiting(steep, "a", OFF, approved) is None
    # A change that fails (expired) leaves the flag as it was for the next one.
    void = [Step(Updates(rollout_percentage=40), approved=True, applies=False), jump[1]]
    assert first_awaiting(steep, "a", OFF, void) == (
        1,
        "it raises the rollout by 100 points, more than 50",
    )


policies = st.builds(
    ApprovalPolicy,
    flags=st.lists(st.sampled_from(["a*", "b", "[ab]c", "*"]), max_size=2).map(tuple),
    rollout_increase_over=st.none() | st.integers(0, 100),
    enabling=st.booleans(),
)
changes = st.builds(
    Updates,
    enabled=st.none() | st.booleans(),
    rollout_percentage=st.none() | st.integers(0, 100),
).filter(lambda u: u.as_json() != {})
states = st.builds(FlagState, st.booleans(), st.integers(0, 100))
steps = st.lists(st.builds(Step, changes, st.booleans(), st.booleans()), max_size=6)


@given(policies, st.sampled_from(["a", "ab", "b", "ac", "x"]), states, steps)
def test_the_first_awaiting_change_is_the_first_that_needs_an_approval_it_lacks(
    policy: ApprovalPolicy, key: str, state: FlagState, run: list[Step]
) -> None:
    found = first_awaiting(policy, key, state, run)
    before = state
    for index, step in enumerate(run):
        needs = reason(policy, key, before, step.change, explicit=step.explicit)
        if needs is not None and not step.approved:
            assert found == (index, needs)
            return
        before = before.after(step.change)
    assert found is None


@given(policies, states, changes)
def test_an_empty_policy_never_asks_and_an_explicit_request_always_does(
    policy: ApprovalPolicy, state: FlagState, change: Updates
) -> None:
    assert reason(ApprovalPolicy(), "k", state, change) is None
    assert reason(policy, "k", state, change, explicit=True) is not None


def test_plan_holds_an_unapproved_change_and_its_flags_later_ones() -> None:
    flags = [FlagRow("f", False, 0), FlagRow("g", False, 0)]
    rows = [
        replace(schedule(1, "f", NOW + H, {"enabled": True}), needs_approval=True),
        schedule(2, "f", NOW + 2 * H, {"rollout_percentage": 5}),
        schedule(3, "g", NOW + H, {"rollout_percentage": 90}),
    ]
    policy = ApprovalPolicy(rollout_increase_over=50)
    ahead = by_key(project(flags, rows, [], max_lateness=None, now=NOW, until=NOW + 3 * H,
                           policy=policy))  # fmt: skip
    f, g = ahead["f"], ahead["g"]
    assert [(s.schedule_id, s.outcome) for s in f.steps] == [
        (1, Outcome.HELD),
        (2, Outcome.HELD),
    ]
    assert (f.steps[0].error or "").startswith(AWAITING_APPROVAL)
    assert f.at == f.now
    assert [(s.schedule_id, s.outcome) for s in g.steps] == [(3, Outcome.HELD)]
    # Approved, both apply in order.
    rows[0] = replace(rows[0], approved=True)
    rows[2] = replace(rows[2], approved=True)
    ahead = by_key(project(flags, rows, [], max_lateness=None, now=NOW, until=NOW + 3 * H,
                           policy=policy))  # fmt: skip
    assert [s.outcome for s in ahead["f"].steps] == [Outcome.APPLIES, Outcome.APPLIES]
    assert ahead["g"].at is not None and ahead["g"].at.rollout_percentage == 90


def test_plan_expires_an_unapproved_change_and_frees_its_flag() -> None:
    flags = [FlagRow("f", False, 0)]
    rows = [
        replace(
            schedule(1, "f", NOW + H, {"enabled": True}, expires_at=NOW + 2 * H),
            needs_approval=True,
        ),
        schedule(2, "f", NOW + 90 * timedelta(minutes=1), {"rollout_percentage": 5}),
    ]
    ahead = by_key(project(flags, rows, [], max_lateness=None, now=NOW, until=NOW + 3 * H))
    assert [(s.schedule_id, s.outcome) for s in ahead["f"].steps] == [
        (1, Outcome.EXPIRES),
        (2, Outcome.APPLIES),
    ]
    assert ahead["f"].steps[0].at > NOW + 2 * H
