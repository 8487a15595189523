"""TLS and basic auth for every endpoint, from the web config file other Prometheus exporters use.

The format is exporter-toolkit's `web-config.yml` (`--web.config.file`), so one file
serves node_exporter and mem-exporter alike:

    tls_server_config: {cert_file: FILE, key_file: FILE, client_auth_type: ..., client_ca_file: FILE,
                        min_version: TLS12}
    http_server_config: {headers: {X-Frame-Options: deny}}
    basic_auth_users: {prometheus: '$2y$10$...'}     # bcrypt hashes

Keys whose behaviour Python's ssl module cannot reproduce are refused by name rather
than ignored: a silently dropped security setting is worse than a clear error.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import ssl
import threading
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator

from .config import ConfigError, _problem_line, _Strict
from .units import read_yaml

TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
TlsVersion = Literal["TLS10", "TLS11", "TLS12", "TLS13"]
HEADERS = (
    "Content-Security-Policy",
    "X-Frame-Options",
    "X-Content-Type-Options",
    "X-XSS-Protection",
    "Strict-Transport-Security",
)
UNSUPPORTED = {
    "tls_server_config.cert": "give the certificate as cert_file",
    "tls_server_config.key": "give the key as key_file",
    "tls_server_config.client_ca": "give the CA as client_ca_file",
    "tls_server_config.client_allowed_sans": (
        "not supported by mem-exporter; issue client certificates from a dedicated CA"
    ),
    "tls_server_config.cipher_suites": "not supported by mem-exporter (OpenSSL's defaults apply)",
    "tls_server_config.curve_preferences": "not supported by mem-exporter (OpenSSL's defaults apply)",
    "rate_limit": "not supported by mem-exporter (see max_connections in the main config)",
}
_BCRYPT = re.compile(r"^\$2[aby]?\$\d\d\$[./A-Za-z0-9]{53}$")
_BCRYPT_COST = re.compile(rb"^\$2[aby]?\$(\d\d)\$")
_CACHE_MAX = 256


class TlsServerConfig(_Strict):
    cert_file: str
    key_file: str
    client_auth_type: str = "NoClientCert"
    client_ca_file: str | None = None
    min_version: TlsVersion = "TLS12"
    max_version: TlsVersion = "TLS13"
    prefer_server_cipher_suites: bool = True

    @field_validator("client_auth_type")
    @classmethod
    def _known_auth(cls, v: str) -> str:
        if v in ("RequestClientCert", "RequireAnyClientCert"):
            raise ValueError(f"{v} accepts certificates without verifying them; use RequireAndVerifyClientCert")
        if v not in CLIENT_AUTH:
            raise ValueError(f"{v!r} is not one of {', '.join(CLIENT_AUTH)}")
        return v


class HttpServerConfig(_Strict):
    http2: bool = Field(True, description="accepted for compatibility; mem-exporter serves HTTP/1.1")
    headers: dict[Literal[HEADERS], str] = Field(default_factory=dict)  # type: ignore[valid-type]


class WebConfigFile(_Strict):
    tls_server_config: TlsServerConfig | None = None
    http_server_config: HttpServerConfig = Field(default_factory=HttpServerConfig)
    basic_auth_users: dict[str, str] = Field(default_factory=dict)

    @field_validator("basic_auth_users")
    @classmethod
    def _bcrypt_hashes(cls, users: dict[str, str]) -> dict[str, str]:
        for user, hashed in users.items():
            if not isinstance(hashed, str) or not _BCRYPT.match(hashed):
                raise ValueError(f"{user}: not a bcrypt hash (make one with: htpasswd -nBC 10 '' | tr -d ':\\n')")
        return users


class WebConfigError(ConfigError):
    """A web config problem: one line naming the file and key (the CLI exits 2, a reload keeps the old one)."""


class WebConfig:
    """What the HTTP server applies per connection (TLS) and per request (auth, headers)."""

    def __init__(
        self,
        source: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        users: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ):
        self.source = source
        self.ssl_context = ssl_context
        self.users = {u: h.encode() for u, h in (users or {}).items()}
        self.headers = dict(headers or {})
        self._passed: set[bytes] = set()  # digests of credentials bcrypt already accepted
        self._lock = threading.Lock()
        self._dummy = b""
        if self.users:
            import bcrypt

            self._bcrypt = bcrypt
            first = _BCRYPT_COST.match(next(iter(self.users.values())))
            if first is None:  # loading the file checks every hash; this guards direct construction
                raise ValueError(f"{source}: basic_auth_users: not a bcrypt hash")
            cost = int(first.group(1))
            # an unknown user costs one bcrypt check too, so timing does not tell which users exist
            self._dummy = bcrypt.hashpw(b"unused", bcrypt.gensalt(max(4, cost)))

    @property
    def tls(self) -> bool:
        return self.ssl_context is not None

    def authorized(self, header: str | None) -> bool:
        """Whether an `Authorization` header carries valid basic auth credentials (always, without users).

        bcrypt is slow on purpose (tens of ms per check), so a check that passed is cached by a
        digest of user, hash and password: a scrape every few seconds costs one hash, not one bcrypt.
        """
        if not self.users:
            return True
        scheme, _, encoded = (header or "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        if not sep:
            return False
        hashed = self.users.get(user)
        digest = hashlib.sha256(b"\0".join((user.encode(), hashed or b"", password.encode()))).digest()
        if digest in self._passed:
            return True
        try:
            ok = self._bcrypt.checkpw(password.encode(), hashed or self._dummy) and hashed is not None  # constant time
        except ValueError:  # bcrypt 5 refuses passwords over 72 bytes
            ok = False
        if ok:
            with self._lock:
                if len(self._passed) >= _CACHE_MAX:
                    self._passed.clear()
                self._passed.add(digest)
        return ok


def _path(base: Path, name: str) -> str:
    """Files named in the web config are relative to its directory, as in exporter-toolkit."""
    return str(base / os.path.expanduser(name))


def _ssl_context(tls: TlsServerConfig, base: Path, source: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.minimum_version = TLS_VERSIONS[tls.min_version]
        ctx.maximum_version = TLS_VERSIONS[tls.max_version]
    except (ValueError, ssl.SSLError) as e:
        raise WebConfigError([f"{source}: tls_server_config.min_version: {e}"]) from None
    if TLS_VERSIONS[tls.min_version] > TLS_VERSIONS[tls.max_version]:
        raise WebConfigError(
            [f"{source}: tls_server_config.min_version: {tls.min_version} is above max_version {tls.max_version}"]
        )
    if tls.prefer_server_cipher_suites:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        ctx.load_cert_chain(_path(base, tls.cert_file), _path(base, tls.key_file))
    except (OSError, ssl.SSLError) as e:
        raise WebConfigError(
            [
                f"{source}: tls_server_config.cert_file: cannot load {tls.cert_file} with "
                f"{tls.key_file}: {getattr(e, 'strerror', None) or e}"
            ]
        ) from None
    ctx.verify_mode = CLIENT_AUTH[tls.client_auth_type]
    if tls.client_ca_file:
        try:
            ctx.load_verify_locations(_path(base, tls.client_ca_file))
        except (OSError, ssl.SSLError) as e:
            raise WebConfigError(
                [
                    f"{source}: tls_server_config.client_ca_file: cannot load {tls.client_ca_file}: "
                    f"{getattr(e, 'strerror', None) or e}"
                ]
            ) from None
    elif ctx.verify_mode != ssl.CERT_NONE:
        raise WebConfigError(
            [f"{source}: tls_server_config.client_ca_file: needed by client_auth_type {tls.client_auth_type}"]
        )
    return ctx


def load_web_config(path: str | None) -> WebConfig:
    """The web config in `path` (plain HTTP without auth when None), or WebConfigError with one line per problem."""
    if path is None:
        return WebConfig()
    source = str(path)
    try:
        data = read_yaml(path)
    except ValueError as e:
        raise WebConfigError([str(e)]) from None
    if data is None:  # an empty file is allowed, as in exporter-toolkit
        data = {}
    if not isinstance(data, dict):
        raise WebConfigError([f"{source}: (top level): must be a mapping of keys, got {type(data).__name__}"])
    problems = [f"{source}: {key}: {why}" for key, why in UNSUPPORTED.items() if _has(data, key)]
    if problems:
        raise WebConfigError(problems)
    try:
        parsed = WebConfigFile.model_validate(data)
    except ValidationError as e:
        raise WebConfigError([_problem_line(source, err) for err in e.errors()]) from None
    if parsed.basic_auth_users:
        try:
            import bcrypt  # noqa: F401
        except ImportError:
            raise WebConfigError(
                [f"{source}: basic_auth_users: needs the Python package bcrypt (pip install bcrypt)"]
            ) from None
    base = Path(path).resolve().parent
    ctx = _ssl_context(parsed.tls_server_config, base, source) if parsed.tls_server_config else None
    return WebConfig(source, ctx, parsed.basic_auth_users, parsed.http_server_config.headers)


def _has(data: dict, dotted: str) -> bool:
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True
