"""Makes `docker compose` available, to check deploy/docker-compose.yml on machines without it.

The Docker client alone has no compose subcommand; it is a CLI plugin. When `docker compose
version` already works, nothing is done. Otherwise Docker Compose v2 is built from its Go
module (the Go module proxy is reachable where Docker's downloads are not) into the user cache
and linked into the Docker CLI's plugin directory (``$DOCKER_CONFIG/cli-plugins``, by default
``~/.docker/cli-plugins``). No Docker engine is needed for `docker compose config`.

Usage: ``python -m deploy.compose install``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from deploy._go import build_go_program
from deploy._proc import InfraError, cache_dir, require_tool

__all__ = ["COMPOSE_VERSION", "install", "main"]

COMPOSE_MODULE = "github.com/docker/compose/v2"
COMPOSE_VERSION = "v2.40.3"
"""The Docker Compose release built when the machine has no compose plugin."""


def _works(docker: str) -> bool:
    done = subprocess.run([docker, "compose", "version"], capture_output=True, check=False)
    return done.returncode == 0


def install() -> str:
    """Ensures `docker compose` works; returns its version line.

    Raises:
        ToolMissingError: No `docker` client, or no `go` to build the plugin with.
        FetchError: Building the plugin failed.
    """
    docker = require_tool("docker", "Install the Docker CLI (the engine is not needed).")
    if not _works(docker):
        binary = cache_dir() / "compose" / COMPOSE_VERSION / "docker-compose"
        build_go_program(COMPOSE_MODULE, COMPOSE_VERSION, "./cmd", binary, "Docker Compose")
        plugins = Path(os.environ.get("DOCKER_CONFIG", Path.home() / ".docker")) / "cli-plugins"
        plugins.mkdir(parents=True, exist_ok=True)
        link = plugins / "docker-compose"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(binary)
        if not _works(docker):
            raise InfraError(f"`docker compose` still fails after installing {link}")
    done = subprocess.run(
        [docker, "compose", "version"], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    """``python -m deploy.compose install``."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["install"]:
        print("usage: python -m deploy.compose install", file=sys.stderr)
        return 2
    try:
        print(install())
    except InfraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
