"""deploy/Dockerfile: hadolint, its shape, and that its build stage's sources make a wheel
that carries the migrations."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.deploy import DEPLOY, REPO, tool

DOCKERFILE = DEPLOY / "Dockerfile"


def hadolint(path: Path) -> tuple[int, list[dict[str, str]]]:
    # Threshold `style`: the lowest level, so any finding fails.
    done = subprocess.run(
        [tool("hadolint"), "--no-color", "--format", "json", "-t", "style", str(path)],
        capture_output=True,
        text=True,
        check=False,
        cwd=path.parent,
    )
    return done.returncode, json.loads(done.stdout or "[]")


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction; comments dropped, continuations joined."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    found = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def test_hadolint_finds_nothing() -> None:
    code, findings = hadolint(DOCKERFILE)
    assert findings == []
    assert code == 0


def test_hadolint_does_fail_on_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN pip install requests\n")
    code, findings = hadolint(bad)
    assert code == 1
    assert {f["code"] for f in findings} >= {"DL3013", "DL3042"}


def test_multi_stage_slim_non_root_with_flagsched_as_entrypoint() -> None:
    steps = instructions(DOCKERFILE.read_text())
    stages = [args for keyword, args in steps if keyword == "FROM"]
    assert stages == ["python:3.11-slim AS build", "python:3.11-slim"]
    runtime = steps[max(i for i, (k, _) in enumerate(steps) if k == "FROM") :]
    assert ("COPY", "--from=build /opt/flagsched /opt/flagsched") in runtime
    users = [args for keyword, args in runtime if keyword == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1])  # numeric, not root
    assert ("ENTRYPOINT", '["flagsched"]') in runtime
    assert ("CMD", '["process"]') in runtime
    env = " ".join(args for keyword, args in runtime if keyword == "ENV")
    assert "PATH=/opt/flagsched/bin:$PATH" in env
    assert "PYTHONDONTWRITEBYTECODE=1" in env  # the root filesystem is read-only


def test_the_build_stage_sources_make_a_wheel_with_the_migrations(tmp_path: Path) -> None:
    """Copy exactly what the build stage COPYs and build the wheel from it, as `pip install .`
    does there (tests/cli/test_wheel.py shows that such a wheel migrates)."""
    steps = instructions(DOCKERFILE.read_text())
    build = steps[: [k for k, _ in steps].index("FROM", 1)]
    context = tmp_path / "context"
    for keyword, args in build:
        if keyword != "COPY":
            continue
        *sources, _ = args.split()
        for pattern in sources:
            matched = list(REPO.glob(pattern.rstrip("/")))
            assert matched, f"COPY {pattern}: nothing to copy, `docker build` would fail"
            for source in matched:
                target = context / source.relative_to(REPO)
                if source.is_dir():
                    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(source, target)
    dist = tmp_path / "dist"
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    built = subprocess.run(
        [*pip_wheel, "-q", "-w", str(dist), str(context)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = dist.glob("flagsched-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read("flagsched-0.1.0.dist-info/METADATA").decode()
    assert {
        "flagsched/cli/__init__.py",
        "flagsched/cli/tick.py",
        "flagsched/migrations/env.py",
        "flagsched/migrations/versions/0001_create_tables.py",
        "flagsched/migrations/versions/0002_retry_columns.py",
        "flagsched/migrations/versions/0003_apply_function.py",
        "flagsched/migrations/versions/0004_record_and_safety.py",
        "flagsched/migrations/versions/0005_recurrences.py",
    } <= names
    assert "Description-Content-Type: text/markdown" in metadata  # README.md was there
