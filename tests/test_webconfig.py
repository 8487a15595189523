"""Endpoint hardening: the exporter-toolkit web config (TLS, basic auth), checked with a real Prometheus;
bad files are one clear line; SIGHUP re-reads; connections are capped and slow clients dropped."""

import base64
import json
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from helpers.metrics import metric_value
from helpers.net import free_port
from helpers.tools import OPENSSL, PROMETHEUS, have
from helpers.waiting import wait_for

from mem_exporter.webconfig import WebConfig, WebConfigError, load_web_config

PASSWORD = "s3cret scrape"
HASH = "$2y$10$X0h1gDsPszWURQaxFh.zoubFi6DXncSjhoQNJgRrnGs7EsimhC7zG"  # exporter-toolkit's example


def hashed(password: str, rounds: int = 4) -> str:
    bcrypt = pytest.importorskip("bcrypt", reason="basic auth needs the bcrypt package")
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds)).decode()


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 (openssl CLI): (cert file, key file)."""
    if not have("openssl"):
        pytest.skip("needs the openssl command")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [
            OPENSSL,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(d / "key.pem"),
            "-out",
            str(d / "cert.pem"),
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return d / "cert.pem", d / "key.pem"


def write_web_config(path, cert, users: dict[str, str]) -> None:
    path.write_text(
        json.dumps(
            {  # JSON is YAML
                "tls_server_config": {"cert_file": str(cert[0]), "key_file": str(cert[1]), "min_version": "TLS12"},
                "http_server_config": {"headers": {"X-Content-Type-Options": "nosniff"}},
                "basic_auth_users": users,
            }
        )
    )


def get(url: str, cafile=None, auth: tuple[str, str] | None = None, timeout: float = 5.0):
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    ctx = ssl.create_default_context(cafile=str(cafile)) if cafile else None
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


# --- the file --------------------------------------------------------------------------------
def test_no_file_means_plain_http_without_auth():
    web = load_web_config(None)
    assert not web.tls and web.authorized(None)


BAD = [
    ("tls_server_config: {cert_file: c, key_file: k, bogus: 1}\n", "tls_server_config.bogus: unknown key"),
    ("tls_server_config: {key_file: k}\n", "tls_server_config.cert_file: required key is missing"),
    (
        "tls_server_config: {cert_file: missing.pem, key_file: missing.key}\n",
        "tls_server_config.cert_file: cannot load missing.pem with missing.key: No such file or directory",
    ),
    (
        "tls_server_config: {cert_file: c, key_file: k, min_version: TLS14}\n",
        "tls_server_config.min_version: Input should be 'TLS10', 'TLS11', 'TLS12' or 'TLS13' (got 'TLS14')",
    ),
    (
        "tls_server_config: {cert_file: c, key_file: k, client_auth_type: RequireAnyClientCert}\n",
        "tls_server_config.client_auth_type: RequireAnyClientCert accepts certificates without verifying them; "
        "use RequireAndVerifyClientCert",
    ),
    (
        "tls_server_config: {cert_file: c, key_file: k, client_allowed_sans: [a]}\n",
        "tls_server_config.client_allowed_sans: not supported by mem-exporter; "
        "issue client certificates from a dedicated CA",
    ),
    (
        "rate_limit: {interval: 1s, burst: 5}\n",
        "rate_limit: not supported by mem-exporter (see max_connections in the main config)",
    ),
    (
        "basic_auth_users: {prometheus: hunter2}\n",
        "basic_auth_users: prometheus: not a bcrypt hash (make one with: htpasswd -nBC 10 '' | tr -d ':\\n')",
    ),
    (
        "http_server_config: {headers: {X-Powered-By: me}}\n",
        "http_server_config.headers.X-Powered-By.[key]: Input should be 'Content-Security-Policy', 'X-Frame-Options', "
        "'X-Content-Type-Options', 'X-XSS-Protection' or 'Strict-Transport-Security' (got 'X-Powered-By')",
    ),
    ("- a list\n", "(top level): must be a mapping of keys, got list"),
]


@pytest.mark.parametrize("text,problem", BAD, ids=[b[1].split(":")[0] for b in BAD])
def test_a_bad_web_config_is_one_line_naming_file_and_key(tmp_path, text, problem):
    f = tmp_path / "web.yml"
    f.write_text(text)
    with pytest.raises(WebConfigError) as e:
        load_web_config(str(f))
    assert e.value.problems == [f"{f}: {problem}"]


def test_cert_paths_are_relative_to_the_web_config(tmp_path, cert):
    shutil.copy(cert[0], tmp_path / "c.pem")
    shutil.copy(cert[1], tmp_path / "k.pem")
    (tmp_path / "web.yml").write_text("tls_server_config: {cert_file: c.pem, key_file: k.pem}\n")
    assert load_web_config(str(tmp_path / "web.yml")).tls


def test_basic_auth_without_bcrypt_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bcrypt", None)  # import bcrypt now fails
    f = tmp_path / "web.yml"
    f.write_text(f"basic_auth_users: {{prometheus: '{HASH}'}}\n")
    with pytest.raises(WebConfigError) as e:
        load_web_config(str(f))
    assert e.value.problems == [f"{f}: basic_auth_users: needs the Python package bcrypt (pip install bcrypt)"]


def test_auth_checks_bcrypt_once_then_caches_and_accepts_htpasswd_hashes():
    web = WebConfig("t", users={"prom": hashed(PASSWORD).replace("$2b$", "$2y$", 1)})  # htpasswd -B writes $2y$
    calls = []
    real = web._bcrypt

    class Counting:
        @staticmethod
        def checkpw(pw, h):
            calls.append(pw)
            return real.checkpw(pw, h)

    web._bcrypt = Counting
    header = lambda u, p: "Basic " + base64.b64encode(f"{u}:{p}".encode()).decode()  # noqa: E731
    assert all(web.authorized(header("prom", PASSWORD)) for _ in range(20))
    assert len(calls) == 1  # bcrypt ran once for twenty scrapes
    assert not web.authorized(header("prom", "wrong"))
    assert not web.authorized(header("nobody", PASSWORD))  # an unknown user still costs one bcrypt check
    assert len(calls) == 3
    for bad in (
        None,
        "",
        "Bearer x",
        "Basic !!!",
        "Basic " + base64.b64encode(b"no-colon").decode(),
        header("prom", "x" * 100),
    ):
        assert not web.authorized(bad)


@pytest.mark.integration
def test_cli_refuses_a_bad_web_config_with_exit_2(tmp_path):
    f = tmp_path / "web.yml"
    f.write_text("basic_auth_users: {prometheus: plain}\n")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mem_exporter",
            "serve",
            "--web.config.file",
            str(f),
            "--gpu-backend",
            "none",
            "--listen",
            f"127.0.0.1:{free_port()}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2
    assert r.stderr.strip() == (
        f"mem-exporter: {f}: basic_auth_users: prometheus: not a bcrypt hash "
        "(make one with: htpasswd -nBC 10 '' | tr -d ':\\n')"
    )


# --- for real --------------------------------------------------------------------------------
def start_tls_daemon(daemon, tmp_path, cert, users, *extra):
    web = tmp_path / "web.yml"
    write_web_config(web, cert, users)
    d = daemon("serve", "--interval", "0.5s", "--gpu-backend", "none", "--web.config.file", str(web), *extra)
    url = d.url.replace("http://", "https://")

    def healthy():
        assert d.proc.poll() is None, d.output()
        try:
            return get(url + "/healthz", cert[0], ("prom", PASSWORD), timeout=1)[0] == 200
        except OSError:
            return False

    wait_for(healthy, 15, what="the TLS daemon's /healthz")
    return d, url, web


@pytest.mark.integration
def test_tls_and_basic_auth_scrape(daemon, tmp_path, cert):
    d, url, _ = start_tls_daemon(daemon, tmp_path, cert, {"prom": hashed(PASSWORD)})
    status, body, headers = get(url + "/metrics", cert[0], ("prom", PASSWORD))
    assert status == 200 and metric_value(body, "mem_exporter_system_memory_total_bytes") > 0
    assert headers["X-Content-Type-Options"] == "nosniff"
    for path in ("/metrics", "/healthz", "/"):  # every endpoint asks for credentials
        status, _, headers = get(url + path, cert[0], ("prom", "wrong"))
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
        assert get(url + path, cert[0])[0] == 401
    status, body, _ = get(d.url + "/metrics")  # plain HTTP to the TLS port
    assert status == 400 and "HTTPS" in body
    with pytest.raises(urllib.error.URLError):  # and a client that does not trust the certificate
        urllib.request.urlopen(url + "/metrics", timeout=5)


@pytest.mark.integration
def test_sighup_rereads_the_web_config_and_keeps_it_when_bad(daemon, tmp_path, cert):
    d, url, web = start_tls_daemon(daemon, tmp_path, cert, {"prom": hashed(PASSWORD)})
    web.write_text("basic_auth_users: {prom: not-a-hash}\n")
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "web config rejected" in d.output(), 10, what="the rejected web config in the log")
    assert get(url + "/metrics", cert[0], ("prom", PASSWORD))[0] == 200  # the old one stays in force
    write_web_config(web, cert, {"prom": hashed("rotated")})
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: get(url + "/metrics", cert[0], ("prom", "rotated"))[0] == 200, 10, what="the new password")
    assert get(url + "/metrics", cert[0], ("prom", PASSWORD))[0] == 401


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(not have("prometheus"), reason="needs prometheus (Debian package)")
def test_real_prometheus_scrapes_through_tls_and_basic_auth(daemon, tmp_path, cert):
    d, _, _ = start_tls_daemon(daemon, tmp_path, cert, {"prom": hashed(PASSWORD)})
    target = f"127.0.0.1:{d.port}"
    jobs = {"mem-tls": PASSWORD, "mem-wrong-password": "wrong"}
    (tmp_path / "prometheus.yml").write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                "scrape_configs": [
                    {
                        "job_name": job,
                        "scheme": "https",
                        "static_configs": [{"targets": [target]}],
                        "tls_config": {"ca_file": str(cert[0])},
                        "basic_auth": {"username": "prom", "password": pw},
                    }
                    for job, pw in jobs.items()
                ],
            }
        )
    )
    port = free_port()
    prom = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "prometheus.log", "w"),
        start_new_session=True,
    )
    try:

        def up(job):
            q = urllib.parse.quote(f'up{{job="{job}"}}')
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?query={q}", timeout=2) as r:
                    result = json.load(r)["data"]["result"]
            except OSError:
                return None
            return result[0]["value"][1] if result else None

        wait_for(lambda: up("mem-tls") == "1", 30, 0.3, what="up{job=mem-tls} == 1 in Prometheus")
        wait_for(lambda: up("mem-wrong-password") == "0", 10, 0.3, what="up{job=mem-wrong-password} == 0")
    finally:
        prom.terminate()
        try:
            prom.wait(10)
        except subprocess.TimeoutExpired:
            prom.kill()


# --- connections -----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.integration
def test_connections_are_capped_with_503_and_silent_clients_dropped(daemon, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("web: {max_connections: 2, timeout: 3s}\n")
    d = daemon("serve", "--config", str(cfg), "--interval", "0.5s", "--gpu-backend", "none").wait_healthy()
    began = time.monotonic()
    idle = []
    for _ in range(2):  # silent clients hold both slots; each accepted before the next connects (a loaded
        idle.append(socket.create_connection(("127.0.0.1", d.port)))  # host must not turn one into the 503)
        time.sleep(0.3)
    try:
        status, body, headers = get(d.url + "/metrics", timeout=2)
        assert (status, headers.get("Retry-After")) == (503, "1")
        for s in idle:  # the server hangs up on them after web.timeout
            s.settimeout(10)
            assert s.recv(1) == b""
        assert 2.5 < time.monotonic() - began < 8
        wait_for(lambda: get(d.url + "/metrics", timeout=2)[0] == 200, 5, what="a free slot again")
    finally:
        for s in idle:
            s.close()


@pytest.mark.integration
def test_sigterm_does_not_wait_for_open_connections(daemon, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("web: {timeout: 60s}\n")
    d = daemon("serve", "--config", str(cfg), "--interval", "0.5s", "--gpu-backend", "none").wait_healthy()
    with socket.create_connection(("127.0.0.1", d.port)) as idle:
        idle.sendall(b"GET /metrics HTTP/1.1\r\n")  # half a request, then silence
        time.sleep(0.2)
        began = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(10) == 0
        assert time.monotonic() - began < 2.0
