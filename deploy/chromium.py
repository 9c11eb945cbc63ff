"""Makes Debian's headless Chromium available for the console's browser tests.

The browser tests drive the distribution's `chromium` package through Playwright's Python
client, pointed at that binary: Playwright's own browser download needs a host this machine
cannot reach, and a distribution package is what an operator's CI has anyway. When
``/usr/bin/chromium`` (or `SAGA_CHROMIUM`) already runs, nothing is done; otherwise the package
is installed with apt-get, which needs root (CI runs as root; elsewhere the error says what to
run).

Usage: ``python -m deploy.chromium install`` (prints the binary and its version).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from deploy._proc import FetchError, InfraError, ToolMissingError

__all__ = ["HEADLESS_ARGS", "binary", "install", "main"]

HEADLESS_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
"""Flags for a headless run on a machine without a display or an outside network (without the
background-networking ones Chromium keeps trying hosts it cannot reach)."""


def binary() -> str:
    """The Chromium to drive: `SAGA_CHROMIUM`, else ``chromium`` on PATH."""
    return os.environ.get("SAGA_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def _version(path: str) -> str | None:
    try:
        done = subprocess.run(
            [path, "--version", *HEADLESS_ARGS[1:]],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


def install() -> str:
    """Ensures Chromium runs; returns ``"<path>: <version>"``.

    Raises:
        ToolMissingError: It is missing and apt-get is not there or not root's to run.
        FetchError: apt-get failed.
    """
    path = binary()
    if (version := _version(path)) is not None:
        return f"{path}: {version}"
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        raise ToolMissingError(
            "Chromium is not installed: run `sudo apt-get install chromium` (Debian/Ubuntu), "
            "or point SAGA_CHROMIUM at a Chromium or Chrome binary"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        [apt, "update", "-qq"],
        [apt, "install", "-y", "-qq", "--no-install-recommends", "chromium", "fonts-dejavu-core"],
    ):
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            raise FetchError(f"`{' '.join(command)}` failed: " + " | ".join(tail))
    path = binary()
    if (version := _version(path)) is None:
        raise InfraError(f"Chromium was installed but {path} --version does not run")
    return f"{path}: {version}"


def main(argv: list[str] | None = None) -> int:
    """``python -m deploy.chromium install``."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["install"]:
        print("usage: python -m deploy.chromium install", file=sys.stderr)
        return 2
    try:
        print(install())
    except InfraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
