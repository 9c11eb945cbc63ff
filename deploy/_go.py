"""Builds a Go program from a module on the Go module proxy into the user cache, once.

`go install module@version` refuses modules whose go.mod has replace directives (Jaeger's and
Docker Compose's both do), so the module source is downloaded, copied to a writable directory
and built there as the main module.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from deploy._proc import FetchError, file_lock, remove_quietly, require_tool

__all__ = ["build_go_program"]

_GO_HINT = "Install Go 1.24 or newer from https://go.dev/dl/ (it builds {what} once)."

_logger = logging.getLogger("deploy.go")


def build_go_program(module: str, version: str, package: str, target: Path, what: str) -> Path:
    """Builds ``package`` of ``module@version`` to ``target`` unless it is already there.

    Returns:
        ``target``, an executable.

    Raises:
        ToolMissingError: `go` is not on PATH (only checked when building).
        FetchError: Downloading the module or building it failed.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / ".lock"):
        if target.is_file() and os.access(target, os.X_OK):
            return target
        go = require_tool("go", _GO_HINT.format(what=what))
        spec = f"{module}@{version}"
        _logger.info("Building %s (%s) into %s; the first build takes minutes", what, spec, target)
        done = subprocess.run(
            [go, "mod", "download", "-json", spec], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise FetchError(f"`go mod download {spec}` failed:\n{done.stdout}{done.stderr}")
        source = Path(json.loads(done.stdout)["Dir"])
        with tempfile.TemporaryDirectory(prefix="build-", dir=target.parent) as scratch:
            work = Path(scratch) / "src"
            # Module cache files are read-only; the copy must be writable so go can update the
            # main module's go.sum if it needs to, and so the scratch tree can be deleted.
            shutil.copytree(source, work)
            for path in (work, *work.rglob("*")):
                path.chmod(path.stat().st_mode | 0o200)
            partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
            argv = [
                go, "build", "-trimpath", "-buildvcs=false", "-ldflags=-s -w",
                "-o", str(partial), package,
            ]  # fmt: skip
            built = subprocess.run(argv, cwd=work, capture_output=True, text=True, check=False)
            if built.returncode != 0:
                remove_quietly(partial)
                tail = "\n".join((built.stdout + built.stderr).splitlines()[-30:])
                raise FetchError(f"building {what} {version} failed:\n{tail}")
            os.replace(partial, target)  # Atomic: the binary exists only once complete.
        return target
