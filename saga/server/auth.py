"""Who is calling: bearer tokens, or the client certificate of a mutual-TLS connection, mapped
to the principals of the authorization policy.

The server never stores a token: a tokens file holds the SHA-256 of each (hex), one per line
with the principal it stands for (``saga serve --hash-token`` prints the line for a token)::

    # sha256(token)                                                   principal
    9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08  alice

A request authenticates with ``Authorization: Bearer <token>`` (scripts), or with the
``saga_token`` cookie that the console's sign-in page sets (browsers; ``SameSite=Strict`` and
``HttpOnly``, so another site can neither read it nor send it). When uvicorn serves TLS and
requires client certificates (``--tls-client-ca``), a connection's certificate names the
caller instead: its subject's common name, else its first DNS or e-mail subject alternative
name. `MtlsProtocol` is the uvicorn protocol that hands the certificate to the application
(uvicorn puts nothing of TLS in the ASGI scope).

Errors are `saga.server.problems.Problem`: 401 with a ``WWW-Authenticate`` challenge when no
valid credential came, 403 when the principal may not do what it asked.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from uvicorn.protocols.http.h11_impl import H11Protocol

from saga.core.policy import valid_name
from saga.errors import ConfigurationError
from saga.server.problems import Problem

__all__ = [
    "PEER_STATE_KEY",
    "TOKEN_COOKIE",
    "Authenticator",
    "MtlsProtocol",
    "Principal",
    "TokenTable",
    "hash_token",
    "principal_of_certificate",
]

TOKEN_COOKIE = "saga_token"
"""The cookie the console's sign-in page sets, holding the bearer token."""
PEER_STATE_KEY = "saga_peer_principal"
"""Where `MtlsProtocol` leaves the certificate's principal in the ASGI scope's ``state``."""


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller."""

    name: str
    """The principal, as the policy and the keyring name it."""
    via: Literal["token", "certificate", "open"]
    """How it was established (``open``: the server runs without authentication)."""


def hash_token(token: str) -> str:
    """The tokens file's form of ``token``: its SHA-256, in hex."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TokenTable:
    """Token hashes and the principals they stand for."""

    principals: Mapping[str, str]
    """``sha256(token)`` in hex -> principal."""

    @classmethod
    def load(cls, path: str | Path) -> TokenTable:
        """Reads a tokens file (see the module docstring).

        Raises:
            ConfigurationError: The file is missing, or a line is not a hash and a principal;
                the message names the file and the line.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigurationError(
                f"tokens file {path}: {exc.strerror or exc}; create it with lines made by "
                "`saga serve --hash-token TOKEN PRINCIPAL`"
            ) from None
        found: dict[str, str] = {}
        for number, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            digest = parts[0].lower() if parts else ""
            ok = (
                len(parts) == 2
                and len(digest) == 64
                and all(c in "0123456789abcdef" for c in digest)
                and valid_name(parts[1])
            )
            if not ok:
                raise ConfigurationError(
                    f"tokens file {path}, line {number}: expected '<sha256 hex> <principal>' "
                    "(`saga serve --hash-token TOKEN PRINCIPAL` prints such a line)"
                )
            found[digest] = parts[1]
        return cls(found)

    def principal(self, token: str) -> str | None:
        """The principal of ``token``, or ``None`` for a token the table does not hold."""
        digest = hash_token(token)
        for known, principal in self.principals.items():
            # Constant time: a timing difference must not tell how much of a hash matched.
            if hmac.compare_digest(known, digest):
                return principal
        return None


def principal_of_certificate(cert: Mapping[str, Any]) -> str | None:
    """The principal a peer certificate names (`ssl.SSLSocket.getpeercert` form): the
    subject's common name, else the first DNS or e-mail subject alternative name."""
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and value:
                return str(value)
    for kind, value in cert.get("subjectAltName", ()):
        if kind in ("DNS", "email") and value:
            return str(value)
    return None


class MtlsProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, handing each connection's client certificate principal to
    the application in the scope's ``state`` (under `PEER_STATE_KEY`)."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        cert = transport.get_extra_info("peercert")
        principal = principal_of_certificate(cert) if cert else None
        # Per connection: this protocol object serves one connection, and uvicorn copies
        # app_state into every request's scope.
        self.app_state = {**self.app_state, PEER_STATE_KEY: principal}


@dataclass(frozen=True)
class Authenticator:
    """Decides who a request comes from.

    Args:
        tokens: Bearer tokens accepted (``None``: none).
        certificates: Whether a client certificate names the caller (uvicorn requires one).
        open_as: Without ``tokens`` or ``certificates``: the principal every request is taken
            to come from (local development: ``saga serve --no-auth``).
    """

    tokens: TokenTable | None = None
    certificates: bool = False
    open_as: str | None = None

    def __post_init__(self) -> None:
        if self.tokens is None and not self.certificates and self.open_as is None:
            raise ConfigurationError(
                "the server needs a way to authenticate callers: a tokens file (--tokens), "
                "client certificates (--tls-client-ca), or --no-auth for local development"
            )

    def authenticate(
        self,
        authorization: str | None,
        cookie: str | None,
        state: Mapping[str, Any],
    ) -> Principal:
        """The caller of a request with these headers and scope state.

        Raises:
            Problem: 401, no credential or an invalid one.
        """
        if self.certificates and (name := state.get(PEER_STATE_KEY)):
            return Principal(str(name), "certificate")
        token = None
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise self._challenge("the Authorization header must be 'Bearer <token>'")
            token = value.strip()
        elif cookie:
            token = cookie
        if token is not None and self.tokens is not None:
            principal = self.tokens.principal(token)
            if principal is None:
                raise self._challenge(
                    "the bearer token is not known to this server", "invalid_token"
                )
            return Principal(principal, "token")
        if self.open_as is not None:
            return Principal(self.open_as, "open")
        raise self._challenge("this request needs a bearer token (Authorization: Bearer <token>)")

    def _challenge(self, detail: str, error: str | None = None) -> Problem:
        challenge = 'Bearer realm="saga"' + (f', error="{error}"' if error else "")
        return Problem(401, "unauthenticated", detail, headers={"WWW-Authenticate": challenge})
