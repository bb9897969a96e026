"""Four eyes, judged: which change needs a second person's approval. Pure: no I/O, no clock.

A change needs approval when it was scheduled with `--approval`, or when the configuration's
`[approval]` policy says so, judged against the flag as it is when the change comes due:
its key matches one of the glob patterns, it switches the flag on (`enabling`), or it
raises the rollout by more than `rollout_increase_over` points. A flag's consecutive
changes in one tick are judged one after another, each against the state the ones before
it leave (a ramp 10, 25, 50, 100 raises the rollout by 50 at most, not by 100)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from flagsched.model import Updates


@dataclass(frozen=True)
class ApprovalPolicy:
    """`[approval]`: which changes need a second person (judged here)."""

    flags: tuple[str, ...] = ()
    rollout_increase_over: int | None = None
    enabling: bool = False


@dataclass(frozen=True, slots=True)
class FlagState:
    """A flag's values as the policy reads them (None: unset, see rows.FlagRow)."""

    enabled: bool | None
    rollout_percentage: int | None

    def after(self, change: Updates) -> FlagState:
        return FlagState(
            self.enabled if change.enabled is None else change.enabled,
            self.rollout_percentage
            if change.rollout_percentage is None
            else change.rollout_percentage,
        )


@dataclass(frozen=True, slots=True)
class Step:
    """One change of a flag, in order, with what is known of its approval."""

    change: Updates
    explicit: bool = False  # scheduled with --approval
    approved: bool = False  # an approved verdict exists
    applies: bool = True  # False: it fails for good (expired) and leaves the flag as it is


def matching_pattern(policy: ApprovalPolicy, flag_key: str) -> str | None:
    """The first of the policy's patterns the flag key matches (case-sensitive globs)."""
    return next((p for p in policy.flags if fnmatchcase(flag_key, p)), None)


def depends_on_state(policy: ApprovalPolicy) -> bool:
    """Does the policy read the flag's values (so the tick must lock and read the flag)?"""
    return policy.enabling or policy.rollout_increase_over is not None


def reason(
    policy: ApprovalPolicy,
    flag_key: str,
    before: FlagState | None,
    change: Updates,
    *,
    explicit: bool = False,
) -> str | None:
    """Why `change` needs approval, judged against the flag as it is (`before`; None: the
    flag does not exist, and only what does not depend on its values counts); None: it
    does not need one."""
    if explicit:
        return "scheduled with --approval"
    pattern = matching_pattern(policy, flag_key)
    if pattern is not None:
        return f"the flag matches the approval pattern {pattern!r}"
    if before is None:
        return None
    if policy.enabling and change.enabled is True and not before.enabled:
        return "it switches the flag on"
    limit = policy.rollout_increase_over
    if limit is not None and change.rollout_percentage is not None:
        increase = change.rollout_percentage - (before.rollout_percentage or 0)  # unset: 0
        if increase > limit:
            return f"it raises the rollout by {increase} points, more than {limit}"
    return None


def first_awaiting(
    policy: ApprovalPolicy, flag_key: str, state: FlagState | None, steps: Sequence[Step]
) -> tuple[int, str] | None:
    """The first of a flag's consecutive changes that needs an approval it has not got, and
    why (None: all may apply). Each is judged against the state the earlier ones leave."""
    for index, step in enumerate(steps):
        why = reason(policy, flag_key, state, step.change, explicit=step.explicit)
        if why is not None and not step.approved:
            return index, why
        if state is not None and step.applies:
            state = state.after(step.change)
    return None
