"""The wheel carries its migrations: `flagsched migrate` works from an installed wheel."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import sqlalchemy as sa

from flagsched.migrate import head
from flagsched.schema import make_engine, metadata

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_installed_wheel_migrates_from_any_directory(
    tmp_path: Path, empty_database_url: str
) -> None:
    wheels = tmp_path / "wheels"
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        wheels,
        ROOT,
        cwd=tmp_path,
    )
    wheel = next(wheels.glob("flagsched-*.whl"))
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    site = next(venv.glob("lib/python*/site-packages"))
    # Dependencies come from this test's environment; flagsched itself only from the wheel.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, wheel)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {
        "FLAGSCHED_DATABASE_URL": empty_database_url,
        "FLAGSCHED_LOG_FORMAT": "json",
        "PATH": "/usr/bin:/bin",
    }
    located = run(
        venv / "bin" / "python",
        "-c",
        "import flagsched; print(flagsched.__file__)",
        cwd=elsewhere,
        env=env,
    )
    assert str(site) in located and str(ROOT) not in located
    run(venv / "bin" / "python", "-m", "flagsched", "migrate", cwd=elsewhere, env=env)
    assert "CREATE TABLE feature_flags" in run(
        venv / "bin" / "python", "-m", "flagsched", "migrate", "--sql", cwd=elsewhere, env=env
    )
    with make_engine(empty_database_url).connect() as conn:
        version = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
        tables = set(
            conn.execute(
                sa.text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            ).scalars()
        )
    assert version == head()
    assert tables == {"alembic_version", *metadata.tables}
    # The agenda page's template ships in the wheel too.
    page = elsewhere / "agenda.html"
    run(
        venv / "bin" / "python", "-m", "flagsched", "agenda", "--html", page,
        cwd=elsewhere, env=env,
    )  # fmt: skip
    assert page.read_text().startswith("<!DOCTYPE html>")
    # So do the named statements (flagsched/sql/queries.sql) a tick sends.
    assert "tick_finished" in run(
        venv / "bin" / "python", "-m", "flagsched", "process", cwd=elsewhere, env=env
    )
