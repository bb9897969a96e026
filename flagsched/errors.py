"""The small error hierarchy. Each class's docstring is its default message; only cli.py exits."""

from __future__ import annotations


class FlagschedError(Exception):
    """flagsched failed."""

    exit_code = 1

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self.args[0])


class ConfigError(FlagschedError):
    """The configuration is invalid."""

    exit_code = 2


class CouldNotRun(FlagschedError):
    """flagsched could not run."""

    exit_code = 3


class DatabaseUnavailable(CouldNotRun):
    """The database could not be reached."""


class SchemaNotCurrent(CouldNotRun):
    """The database schema is not at the latest revision: run `flagsched migrate`."""


class NotPermitted(CouldNotRun):
    """The login lacks a privilege every tick needs: re-run the grants after each migrate."""


class UnsupportedDatabase(CouldNotRun):
    """flagsched cannot work with this database as it is (its encoding, or a schema revision
    this version does not know); nothing was changed."""


class DatabaseError(CouldNotRun):
    """A database statement failed."""


# SQLSTATE lock_not_available: a lock not granted within lock_timeout (or NOWAIT).
LOCK_NOT_AVAILABLE = "55P03"


class StatementFailed(FlagschedError):
    """A statement inside a savepoint failed; the savepoint was rolled back."""

    def __init__(self, message: str | None = None, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate

    @property
    def busy(self) -> bool:
        """Only a lock not granted in time: anything else is not worth trying again."""
        return self.sqlstate == LOCK_NOT_AVAILABLE

    @property
    def transient(self) -> bool:
        """Another transaction was in the way (a lock not granted in time, a statement
        timeout, a deadlock or a serialization failure): the same statement may succeed at
        the next tick, nothing about the row is wrong."""
        return self.sqlstate in _TRANSIENT


_TRANSIENT = frozenset({LOCK_NOT_AVAILABLE, "57014", "40P01", "40001"})


class LockNotGranted(CouldNotRun):
    """A lock was not granted within the lock timeout: another transaction holds it."""

    def __init__(self, message: str | None = None, what: str = "") -> None:
        super().__init__(message)
        self.what = what  # what was to be locked, for a message
