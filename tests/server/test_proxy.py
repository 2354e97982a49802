"""The Fleet API proxy: a real nginx in front of a real TLS SuperLink on loopback.

Only the Fleet API may pass; the unauthenticated Control API must not be
reachable through the public port.
"""

from __future__ import annotations

import datetime
import functools
import http.client
import ipaddress
import os
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.errors import FederationError
from common.flower import flower_bin, flower_env
from common.processes import (
    LOOPBACK,
    ManagedProcess,
    ProcessSet,
    alive,
    can_connect,
    descendants,
    free_port,
)
from server.proxy import (
    FORBIDDEN_BODY,
    nginx_binary,
    render_nginx_conf,
    start_fleet_proxy,
    upstream_tls_name,
)

PROTOBUF = "application/protobuf"


def _have_nginx() -> bool:
    try:
        nginx_binary()
    except FederationError:
        return False
    return True


needs_nginx = pytest.mark.skipif(not _have_nginx(), reason="nginx missing; run `make install`")


@dataclass(frozen=True)
class Pki:
    """A throwaway consortium CA and the coordinator's server certificate."""

    ca: Path
    cert: Path
    key: Path


def _write_pki(folder: Path, *, dns_names: tuple[str, ...] = ("localhost",)) -> Pki:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedrad test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    san = [x509.IPAddress(ipaddress.ip_address(LOOPBACK)), *(x509.DNSName(d) for d in dns_names)]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "coordinator")]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(ca=folder / "ca.crt", cert=folder / "server.crt", key=folder / "server.key")
    pki.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pki.key.chmod(0o600)
    return pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return _write_pki(tmp_path_factory.mktemp("pki"))


@dataclass
class Coordinator:
    """A TLS SuperLink on an internal port and the proxy on a public one."""

    pki: Pki
    internal: int
    public: int
    superlink: ManagedProcess
    proxy: ManagedProcess
    workdir: Path


def _start_superlink(procs: ProcessSet, pki: Pki, port: int, workdir: Path) -> ManagedProcess:
    superlink = procs.start(
        "SuperLink",
        [
            flower_bin("flower-superlink"),
            "--ssl-ca-certfile", str(pki.ca), "--ssl-certfile", str(pki.cert),
            "--ssl-keyfile", str(pki.key), "--enable-supernode-auth",
            "--host", LOOPBACK, "--port", str(port),
            "--disable-runtime-dependency-installation",
        ],
        env=flower_env(workdir / "flwr-home"),
        log_path=workdir / "superlink.log",
    )
    deadline = time.monotonic() + 60
    while not can_connect(LOOPBACK, port, timeout=0.5):
        assert superlink.running() and time.monotonic() < deadline, superlink.tail(30)
        time.sleep(0.2)
    return superlink


@pytest.fixture(scope="module")
def coordinator(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    if not _have_nginx():
        pytest.skip("nginx missing; run `make install`")
    workdir = tmp_path_factory.mktemp("coordinator")
    with ProcessSet() as procs:
        internal = free_port()
        superlink = _start_superlink(procs, pki, internal, workdir)
        public = free_port()
        proxy = start_fleet_proxy(
            procs, listen_host=LOOPBACK, listen_port=public, upstream_port=internal,
            cert=pki.cert, key=pki.key, ca=pki.ca, workdir=workdir,
        )
        yield Coordinator(pki, internal, public, superlink, proxy, workdir)


def _trusting(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def _post(
    port: int, path: str, ca: Path, *, body: bytes = b"", headers: dict[str, str] | None = None,
    method: str = "POST",
) -> tuple[int, bytes]:
    conn = http.client.HTTPSConnection(LOOPBACK, port, context=_trusting(ca), timeout=30)
    try:
        conn.request(method, path, body=body, headers={"content-type": PROTOBUF, **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# --- configuration ----------------------------------------------------------


def test_render_nginx_conf_forwards_only_the_fleet_api_with_upstream_verification(
    pki: Pki, tmp_path: Path,
) -> None:
    conf = render_nginx_conf(
        listen_host="0.0.0.0", listen_port=9443, upstream_port=19092,
        cert=pki.cert, key=pki.key, ca=pki.ca, prefix=tmp_path,
    )
    assert "listen 0.0.0.0:9443 ssl;" in conf
    assert "location ^~ /v1/fleet/ {" in conf
    assert '"~^POST /v1/fleet/[a-z][a-z0-9-]*$" 1;' in conf
    assert "server 127.0.0.1:19092;" in conf and "proxy_pass https://fedrad_superlink;" in conf
    assert "proxy_ssl_verify on;" in conf
    assert f'proxy_ssl_trusted_certificate "{pki.ca.resolve()}";' in conf
    assert 'proxy_ssl_name "localhost";' in conf
    # The catch-all answers 403 itself; nothing else is proxied.
    catch_all = conf.split("location / {", 1)[1].split("}", 1)[0]
    assert "return 403" in catch_all and "proxy_pass" not in catch_all
    assert conf.count("proxy_pass") == 1
    assert "client_max_body_size 2g;" in conf and "proxy_request_buffering off;" in conf
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        assert f'{kind}_temp_path "{tmp_path.resolve() / "temp" / kind}";' in conf
    assert not [line for line in conf.splitlines() if line.strip().startswith("user ")]  # only when asked (we run as root)
    assert "user nobody nogroup;" in render_nginx_conf(
        listen_host="::", listen_port=9443, upstream_port=19092, cert=pki.cert, key=pki.key,
        ca=pki.ca, prefix=tmp_path, worker_user="nobody nogroup",
    )


def test_render_nginx_conf_fills_every_placeholder_and_refuses_quotes(pki: Pki, tmp_path: Path) -> None:
    render = functools.partial(render_nginx_conf, listen_host="::1", listen_port=9443, upstream_port=19092,
                               cert=pki.cert, key=pki.key, ca=pki.ca)
    conf = render(prefix=tmp_path)
    assert "%{" not in conf and "listen [::1]:9443 ssl;" in conf
    assert conf.count(f'return 403 "{FORBIDDEN_BODY.strip()}\\n";') == 2
    with pytest.raises(FederationError, match="quote or newline"):
        render(prefix=tmp_path / 'a"b')


def test_upstream_name_comes_from_a_dns_name_of_the_certificate(tmp_path: Path) -> None:
    assert upstream_tls_name(_write_pki(tmp_path / "a", dns_names=("coord.example", "localhost")).cert) == "localhost"
    assert upstream_tls_name(_write_pki(tmp_path / "b", dns_names=("coord.example",)).cert) == "coord.example"
    with pytest.raises(FederationError, match="no DNS name"):
        upstream_tls_name(_write_pki(tmp_path / "c", dns_names=()).cert)


@needs_nginx
def test_an_invalid_configuration_is_one_clear_error(pki: Pki, tmp_path: Path) -> None:
    with ProcessSet() as procs, pytest.raises(FederationError, match="configuration .* is invalid: .*"):
        start_fleet_proxy(
            procs, listen_host=LOOPBACK, listen_port=free_port(), upstream_port=free_port(),
            cert=pki.cert, key=pki.ca, ca=pki.ca, workdir=tmp_path,  # a certificate is no key
        )
    assert not procs.processes


@needs_nginx
def test_a_port_in_use_is_one_clear_error(pki: Pki, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind((LOOPBACK, 0))
        busy.listen()
        port = busy.getsockname()[1]
        with ProcessSet() as procs, pytest.raises(FederationError, match="cannot listen on .*in use"):
            start_fleet_proxy(
                procs, listen_host=LOOPBACK, listen_port=port, upstream_port=free_port(),
                cert=pki.cert, key=pki.key, ca=pki.ca, workdir=tmp_path,
            )
    assert not procs.processes


@needs_nginx
def test_nginx_exiting_at_start_is_one_error_with_its_log_tail(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from server import proxy

    # Skip both pre-checks (`nginx -t` would catch this one) to reach nginx failing for real.
    monkeypatch.setattr(proxy, "_check_can_listen", lambda host, port: None)
    monkeypatch.setattr(proxy, "_check_conf", lambda binary, prefix, conf: None)
    with ProcessSet() as procs, pytest.raises(FederationError, match=r"exited at start.*error log .* ends with: .*bind\(\)"):
        start_fleet_proxy(  # TEST-NET-1: not an address of this machine
            procs, listen_host="192.0.2.1", listen_port=free_port(), upstream_port=free_port(),
            cert=pki.cert, key=pki.key, ca=pki.ca, workdir=tmp_path,
        )


def test_missing_nginx_says_make_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from server import proxy

    monkeypatch.setattr(proxy.shutil, "which", lambda name: None)
    monkeypatch.setattr(proxy, "_SEARCH_PATHS", ())
    with pytest.raises(FederationError, match="make install"):
        nginx_binary()


# --- a real proxy in front of a real SuperLink ------------------------------


def test_control_api_is_forbidden_through_the_proxy_but_exists_behind_it(coordinator: Coordinator) -> None:
    ca = coordinator.pki.ca
    status, body = _post(coordinator.public, "/v1/control/list-runs", ca)
    assert (status, body.decode()) == (403, FORBIDDEN_BODY)
    direct_status, direct_body = _post(coordinator.internal, "/v1/control/list-runs", ca)
    assert direct_status != 403 and direct_body.decode(errors="replace") != FORBIDDEN_BODY


def test_the_control_api_from_this_process_answers_as_the_flwr_cli_does(coordinator: Coordinator,
                                                                          tmp_path: Path) -> None:
    """fl-server calls `flwr ls/stop/supernode register/unregister` in-process (common/adapters/control.py)."""
    from common.adapters.control import control_call, handles
    from server.enroll import Consortium
    from server.superlink import CONNECTION, flwr_cli, write_connection

    home = tmp_path / "cli"
    write_connection(home, coordinator.internal, ca_cert=coordinator.pki.ca)
    env = flower_env(home)
    kit = Consortium(tmp_path / "consortium").enroll("A", server_address="127.0.0.1:9092")
    assert handles(["ls", CONNECTION]) and handles(["supernode", "register"]) and not handles(["run", "."])

    registered = control_call(["supernode", "register", str(kit / "site.pub"), CONNECTION], home)
    assert registered["success"] and int(registered["node-id"]) > 0
    with pytest.raises(FederationError, match="already"):  # Flower's own refusal, as `flwr` prints it
        control_call(["supernode", "register", str(kit / "site.pub"), CONNECTION], home)
    assert control_call(["ls", CONNECTION], home) == {"success": True, "runs": []}
    with pytest.raises(FederationError, match="`flwr stop` failed: .*"):
        control_call(["stop", "12345", CONNECTION], home)
    control_call(["supernode", "unregister", str(registered["node-id"]), CONNECTION], home)
    with pytest.raises(FederationError, match="`flwr supernode` failed"):  # unregistered: gone for good
        control_call(["supernode", "unregister", str(registered["node-id"]), CONNECTION], home)
    # The `flwr` process itself answers with the same shape.
    import subprocess

    other = Consortium(tmp_path / "consortium").enroll("B", server_address="127.0.0.1:9092")
    out = subprocess.run([flower_bin("flwr"), "supernode", "register", str(other / "site.pub"), CONNECTION, "--format",
                          "json"], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert '"node-id"' in out.stdout, out.stdout + out.stderr
    assert flwr_cli(["ls", CONNECTION], env)["runs"] == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/runtime/acquire-task"),
        ("GET", "/health"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("GET", "/v1/fleet/pull-messages"),  # right path, wrong method
        ("POST", "/v1/fleet/pull-messages?x=1"),
        ("POST", "/v1/fleet/../control/list-runs"),
        ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
        ("POST", "/v1/fleet//pull-messages"),
        ("POST", "/v1/control/../fleet/pull-messages"),
    ],
)
def test_everything_but_fleet_calls_gets_nginx_403(coordinator: Coordinator, method: str, path: str) -> None:
    assert _post(coordinator.public, path, coordinator.pki.ca, method=method) == (403, FORBIDDEN_BODY.encode())


def test_fleet_call_reaches_the_superlink(coordinator: Coordinator) -> None:
    status, body = _post(coordinator.public, "/v1/fleet/pull-messages", coordinator.pki.ca)
    assert status == 401, body  # the SuperLink's own answer: no SuperNode auth headers
    assert body.decode(errors="replace") != FORBIDDEN_BODY and b"Invalid SuperNode authentication" in body


def test_signed_supernode_headers_pass_through_untouched(coordinator: Coordinator) -> None:
    """An enrolled SuperNode key, signing as a SuperNode does, activates through the proxy."""
    import httpx
    from flwr.proto.control_pb2 import RegisterNodeRequest, RegisterNodeResponse
    from flwr.proto.fleet_pb2 import ActivateNodeRequest
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
    from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    ca = coordinator.pki.ca
    private_key, public_key = generate_key_pairs()
    key_bytes = public_key_to_bytes(public_key)
    # Enrolment goes to the Control API on the internal port, as the coordinator does.
    status, body = _post(
        coordinator.internal, "/v1/control/register-node", ca,
        body=RegisterNodeRequest(public_key=key_bytes, name="site-a").SerializeToString(),
    )
    assert status == 200, body
    enrolled = RegisterNodeResponse.FromString(body).node_id

    address = f"{LOOPBACK}:{coordinator.public}"
    version = RuntimeVersionHttpInterceptor(component_name="SuperNode")
    request = ActivateNodeRequest(public_key=key_bytes, heartbeat_interval=30)
    with (
        FleetHttpClient.from_server_address(address, False, ca.read_bytes(), interceptors=[version]) as bare,
        pytest.raises(httpx.HTTPStatusError) as unsigned,
    ):
        bare.ActivateNode(request)
    assert unsigned.value.response.status_code == 401
    signer = NodeAuthHttpInterceptor(private_key, public_key)
    with FleetHttpClient.from_server_address(
        address, False, ca.read_bytes(), interceptors=[version, signer],
    ) as signed:
        assert signed.ActivateNode(request).node_id == enrolled != 0


def test_a_large_update_streams_through(coordinator: Coordinator) -> None:
    from flwr.proto.message_pb2 import PushObjectRequest
    from flwr.proto.node_pb2 import Node

    # 48 MB: far beyond nginx's 1 MB default body limit and its in-memory buffers.
    request = PushObjectRequest(
        node=Node(node_id=1), run_id=1, object_id="x", object_content=os.urandom(48 << 20),
    )
    status, body = _post(
        coordinator.public, "/v1/fleet/push-object", coordinator.pki.ca, body=request.SerializeToString(),
    )
    # The SuperLink parsed the whole message before it checked (missing) SuperNode auth.
    assert (status, b"Invalid SuperNode authentication" in body) == (401, True), body[:200]
    error_log = coordinator.workdir / "proxy" / "logs" / "error.log"
    assert "Permission denied" not in error_log.read_text()


def test_plain_http_on_the_proxy_port_gets_no_answer(coordinator: Coordinator) -> None:
    conn = http.client.HTTPConnection(LOOPBACK, coordinator.public, timeout=10)
    try:
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
            conn.request("POST", "/v1/control/list-runs", body=b"", headers={"content-type": PROTOBUF})
            conn.getresponse()
    finally:
        conn.close()


def test_a_client_that_does_not_trust_our_ca_fails_the_handshake(
    coordinator: Coordinator, tmp_path: Path,
) -> None:
    for context in (ssl.create_default_context(), _trusting(_write_pki(tmp_path).ca)):
        with (
            socket.create_connection((LOOPBACK, coordinator.public), timeout=10) as raw,
            pytest.raises(ssl.SSLCertVerificationError),
        ):
            context.wrap_socket(raw, server_hostname="localhost")


def test_stopping_the_process_set_stops_nginx_master_and_workers(pki: Pki, tmp_path: Path) -> None:
    if not _have_nginx():
        pytest.skip("nginx missing; run `make install`")
    port = free_port()
    with ProcessSet() as procs:
        proxy = start_fleet_proxy(
            procs, listen_host=LOOPBACK, listen_port=port, upstream_port=free_port(),
            cert=pki.cert, key=pki.key, ca=pki.ca, workdir=tmp_path,
        )
        started = [proxy.pid, *descendants(proxy.pid)]
        assert len(started) >= 2  # master and at least one worker
        # Nothing behind it: a Fleet call gets nginx's 502, the TLS side works.
        assert _post(port, "/v1/fleet/pull-messages", pki.ca)[0] == 502
    assert not any(alive(pid) for pid in started)
    assert not can_connect(LOOPBACK, port)
