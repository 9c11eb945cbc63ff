"""The Go participant of tests/conformance/go: built once per source, run as a process.

`build` compiles it into ``~/.cache/saga-engine/conformance`` (``$XDG_CACHE_HOME`` honoured)
under a name keyed by the SHA-256 of its sources and the Go version, so CI builds it once and a
changed source builds again. It fails, never skips, when Go is missing: a conformance test that
tested nothing must not pass. `GoParticipant` runs the binary, collects the JSON lines it
reports on stdout, and stops it (SIGTERM, then SIGKILL) whatever happened.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import orjson

__all__ = ["SOURCE", "GoParticipant", "build"]

SOURCE = Path(__file__).resolve().parent / "go"
"""The Go module of the participant."""


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "saga-engine" / "conformance"


def build() -> Path:
    """The participant's binary, built if this source has not been built yet.

    Raises:
        RuntimeError: Go is missing, or the build failed (with its output).
    """
    go = shutil.which("go")
    if go is None:
        raise RuntimeError(
            "the Go toolchain is not on PATH: the conformance test needs Go 1.26 or later "
            "(https://go.dev/dl, or the distribution's golang package) to build its participant"
        )
    version = subprocess.run([go, "version"], capture_output=True, text=True, check=True).stdout
    digest = hashlib.sha256(version.encode())
    for path in sorted(SOURCE.iterdir()):
        if path.suffix == ".go" or path.name in ("go.mod", "go.sum"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    binary = _cache_dir() / f"participant-{digest.hexdigest()[:16]}"
    if binary.is_file():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    partial = binary.with_name(f"{binary.name}.{os.getpid()}.tmp")
    # -mod=readonly: go.sum pins every module; a source that needs another fails here.
    done = subprocess.run(
        [go, "build", "-mod=readonly", "-o", str(partial), "."],
        cwd=SOURCE,
        capture_output=True,
        text=True,
        env={**os.environ, "CGO_ENABLED": "0"},
        timeout=600,
    )
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"building the Go participant failed:\n{done.stdout}{done.stderr}")
    os.replace(partial, binary)  # whole or not at all: a concurrent build writes the same
    for old in binary.parent.glob("participant-*"):
        if old != binary and not old.name.endswith(".tmp"):
            old.unlink(missing_ok=True)  # built from an older source: never used again
    return binary


class GoParticipant:
    """One run of the Go participant; a context manager that stops it on exit.

    Args:
        binary: From `build`.
        args: Its flags (``-bootstrap``, ``-prefix``, ...).
        log: Where its standard error goes (a file: a pipe nobody reads could fill up).
    """

    def __init__(self, binary: Path, args: Sequence[str], log: Path) -> None:
        self.binary = binary
        self.args = list(args)
        self.log = log
        self.reports: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> GoParticipant:
        with self.log.open("ab") as errors:
            self._proc = subprocess.Popen(
                [str(self.binary), *self.args], stdout=subprocess.PIPE, stderr=errors
            )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            report = orjson.loads(line)
            with self._lock:
                self.reports.append(report)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> int:
        """Stops the process (it finishes the command in hand, commits and leaves its group);
        returns its exit status."""
        proc = self._proc
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
        return proc.returncode

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def seen(self, **match: Any) -> list[dict[str, Any]]:
        """The reports whose fields equal ``match``."""
        with self._lock:
            found = list(self.reports)
        return [r for r in found if all(r.get(k) == v for k, v in match.items())]

    async def wait_for(
        self, ok: Callable[[], bool], timeout: float = 30.0, what: str = "a report"
    ) -> None:
        """Waits until ``ok()``, failing with the process's reports if it exits or time runs out."""
        with anyio.move_on_after(timeout):
            while not ok():
                if not self.running:
                    break
                await anyio.sleep(0.1)
            if ok():
                return
        status = "exited" if not self.running else "still running"
        errors = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
        raise AssertionError(
            f"the Go participant ({status}) did not report {what} in {timeout:g}s; "
            f"reports: {self.reports[-10:]}; stderr: {errors}"
        )
