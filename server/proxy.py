"""The public face of the coordinator: an nginx reverse proxy that serves only the Fleet API.

Flower's SuperLink serves the Fleet API (what SuperNodes call), the Control API
(``flwr run``, node registration, run management) and the Runtime API on one
HTTPS port. In open-source Flower the Control API is unauthenticated, so a
hospital must never reach it. The SuperLink therefore binds ``127.0.0.1`` and
this proxy listens on the public address with the coordinator's certificate:

- ``POST /v1/fleet/<method>`` (exactly that shape of request URI, no query) is
  forwarded to ``https://127.0.0.1:<upstream_port>``, verifying the
  SuperLink's certificate against the consortium CA. The SuperNode
  authentication headers (``flwr-public-key``, ``flwr-signature``,
  ``flwr-timestamp``) pass through untouched; the SuperLink checks them.
- everything else (Control and Runtime APIs, ``/health``, ``/docs``, other
  methods) is answered by nginx itself with 403 and :data:`FORBIDDEN_BODY`.
- a plain-HTTP request to the TLS port gets its connection closed, no answer.

Every request is logged to ``<workdir>/proxy/logs/access.log`` in nginx's
``combined`` format followed by ``$request_length`` (bytes the caller sent:
request line, headers, body), ``$msec`` (epoch seconds) and the
``flwr-public-key`` header in quotes (``"-"`` when absent), which tells the
sites apart: ``benchmarks/secagg.py`` measures each site's upload with it.

Request and response bodies are streamed (no buffering, no temporary files),
so model updates of any realistic size pass, and nginx worker processes never
need to touch the file system — which is what lets them run as ``nobody``
when the coordinator runs as root.
"""

from __future__ import annotations

import functools
import grp
import logging
import os
import pwd
import re
import shutil
import socket
import string
import subprocess
from pathlib import Path

from common.errors import FederationError
from common.processes import LOOPBACK, ManagedProcess, ProcessSet, can_connect, wait_until

log = logging.getLogger(__name__)

#: Every path a SuperNode calls (flwr/supernode/fleet_http_client.py) is ``/v1/fleet/<name>``.
FLEET_URI_REGEX = r"^/v1/fleet/[a-z][a-z0-9-]*$"
#: What nginx answers to anything that is not a Fleet API call.
FORBIDDEN_BODY = "fedrad: forbidden; this port serves only the Flower Fleet API\n"
#: Largest request body; model updates are tens of MB, objects are pushed in chunks.
MAX_BODY_SIZE = "2g"
#: Seconds for reading/sending a request or response; rounds can be slow, uploads large.
IO_TIMEOUT_S = 600
START_TIMEOUT_S = 20.0
# "2026/01/01 12:00:00 [emerg] 123#123: *5 message" -> "[emerg] message"
_LOG_PREFIX = re.compile(r"^\S+ \S+ \[(\w+)\] \d+#\d+: (?:\*\d+ )?")
_HOST = re.compile(r"[A-Za-z0-9.:\[\]-]+")
_SEARCH_PATHS = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
#: The configuration with ``%{name}`` placeholders that :func:`render_nginx_conf` fills in.
NGINX_TEMPLATE = Path(__file__).parent / "templates" / "nginx.conf"


def nginx_binary() -> str:
    """Path of the nginx executable: on PATH, else in the usual ``sbin`` folders (not on a user's PATH on Debian).

    Raises
    ------
    FederationError
        When nginx is not installed.
    """
    found = shutil.which("nginx") or next((c for c in _SEARCH_PATHS if os.access(c, os.X_OK)), None)
    if found:
        return found
    raise FederationError(
        "nginx is not installed (needed for the coordinator's Fleet API proxy); "
        "run `make install`, or install the `nginx` package"
    )


def upstream_tls_name(cert: Path) -> str:
    """The DNS name nginx checks the SuperLink's certificate (``cert``, PEM) against.

    nginx verifies an upstream certificate by DNS name only (an IP address SAN
    never matches), so we use a DNS name from the coordinator's certificate,
    which the SuperLink serves too: ``localhost`` when present, else the first.

    Raises
    ------
    FederationError
        When the certificate cannot be read or has no DNS name.
    """
    from cryptography import x509

    try:
        certificate = x509.load_pem_x509_certificate(cert.read_bytes())
    except (OSError, ValueError) as exc:
        raise FederationError(f"Could not read the server certificate {cert}: {exc}") from exc
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if not names:
        raise FederationError(
            f"The server certificate {cert} has no DNS name; the proxy verifies the SuperLink "
            "by DNS name, so issue it with a DNS subject alternative name (e.g. localhost)"
        )
    return "localhost" if "localhost" in names else names[0]


def _worker_user() -> str | None:
    """``user nobody <its group>`` when we run as root (nginx ignores ``user`` otherwise)."""
    if os.geteuid() != 0:
        return None
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError as exc:
        raise FederationError("Running as root, but there is no `nobody` user for nginx workers") from exc
    try:
        group = grp.getgrgid(nobody.pw_gid).gr_name
    except KeyError:
        group = str(nobody.pw_gid)
    return f"nobody {group}"


class _NginxTemplate(string.Template):
    delimiter = "%"  # placeholders are %{name}: nginx's own variables start with `$`


def _quote(value: object) -> str:
    text = str(value)
    if any(c in text for c in "\"\\\n\r"):
        raise FederationError(f"Cannot use {text!r} in the nginx configuration (quote or newline)")
    return f'"{text}"'


def render_nginx_conf(
    *, listen_host: str, listen_port: int, upstream_port: int, cert: Path, key: Path, ca: Path, prefix: Path,
    upstream_name: str | None = None, worker_user: str | None = None,
) -> str:
    """The nginx configuration text of the Fleet API proxy: :data:`NGINX_TEMPLATE` filled in.

    Parameters
    ----------
    listen_host, listen_port
        Public address the proxy listens on (TLS only).
    upstream_port
        Port of the SuperLink on 127.0.0.1 (HTTPS).
    cert, key
        The coordinator's server certificate and private key (PEM), shown to SuperNodes.
    ca
        The consortium CA certificate; the SuperLink's certificate must chain to it.
    prefix
        Folder that holds everything nginx writes: pid file, logs, temporary folders.
    upstream_name
        DNS name the SuperLink's certificate must carry; default from ``cert`` (:func:`upstream_tls_name`).
    worker_user
        Argument of nginx's ``user`` directive (``"nobody nogroup"``); emitted only when given (root).
    """
    if not _HOST.fullmatch(listen_host) or not 0 < listen_port < 65536 or not 0 < upstream_port < 65536:
        raise FederationError(
            f"Expected a host name or IP address and ports in 1..65535 for the proxy, but got "
            f"{listen_host!r}:{listen_port} -> {upstream_port}"
        )
    prefix = prefix.resolve()
    name = upstream_name or upstream_tls_name(cert)
    host = f"[{listen_host}]" if ":" in listen_host and "[" not in listen_host else listen_host
    quoted: dict[str, object] = {
        f"{kind}_temp": prefix / "temp" / kind for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    }
    quoted |= {"pid": prefix / "nginx.pid", "error_log": prefix / "logs" / "error.log",
               "access_log": prefix / "logs" / "access.log", "cert": cert.resolve(), "key": key.resolve(),
               "ca": ca.resolve(), "upstream_name": name}
    values = {slot: _quote(value) for slot, value in quoted.items()}
    values |= {
        "user_line": f"user {worker_user};\n" if worker_user else "",
        "listen": f"{host}:{listen_port}", "upstream": f"{LOOPBACK}:{upstream_port}",
        "fleet_uri": FLEET_URI_REGEX[1:], "forbidden": FORBIDDEN_BODY.strip(),
        "max_body_size": MAX_BODY_SIZE, "io_timeout": str(IO_TIMEOUT_S),
    }
    return _NginxTemplate(NGINX_TEMPLATE.read_text(encoding="utf-8")).substitute(values)


@functools.cache
def _has_error_log_option(binary: str) -> bool:
    """Whether nginx knows ``-e`` (1.19.5 and later; Debian 11 ships 1.18)."""
    try:
        out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    found = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out.stderr + out.stdout)
    if found is None:
        return False
    return tuple(int(n) for n in found.groups()) >= (1, 19, 5)


def _nginx_cmd(binary: str, prefix: Path, conf: Path) -> list[str]:
    cmd = [binary, "-p", f"{prefix}/", "-c", str(conf)]
    if _has_error_log_option(binary):
        # The log for messages before the configuration is read; the compiled-in one
        # (stderr or /var/log/nginx) is not ours, and not writable for a normal user.
        cmd += ["-e", str(prefix / "logs" / "error.log")]
    return cmd


def _check_conf(binary: str, prefix: Path, conf: Path) -> None:
    proc = subprocess.run([*_nginx_cmd(binary, prefix, conf), "-t", "-q"],
                          capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "[emerg]" in ln), lines[-1] if lines else "no output")
        detail = detail.split("] ", 1)[-1] if "[emerg]" in detail else detail
        raise FederationError(f"The Fleet API proxy configuration {conf} is invalid: {detail}")


def _check_can_listen(host: str, port: int) -> None:
    """Fail early when ``host:port`` cannot be bound: else the wait below could see someone else's port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as nginx does
        try:
            s.bind((host.strip("[]"), port))
        except OSError as exc:
            raise FederationError(
                f"The Fleet API proxy cannot listen on {host}:{port}: {exc.strerror or exc}; "
                "choose another address or port"
            ) from exc


def _errors_since(path: Path, offset: int, lines: int = 3) -> str:
    """The last ``lines`` messages nginx logged after ``offset``, without timestamps, on one line."""
    try:
        text = path.read_bytes()[offset:].decode(errors="replace")
    except OSError:
        return ""
    found = [_LOG_PREFIX.sub(r"[\1] ", ln) for ln in text.splitlines() if ln.strip()]
    return " | ".join(found[-lines:])


def start_fleet_proxy(
    procs: ProcessSet, *, listen_host: str, listen_port: int, upstream_port: int, cert: Path, key: Path, ca: Path,
    workdir: Path, upstream_name: str | None = None, timeout: float = START_TIMEOUT_S,
) -> ManagedProcess:
    """Start nginx in front of the SuperLink, serving only the Fleet API; returns the nginx master process.

    nginx runs in the foreground (``daemon off``) as a child of ``procs``, with
    its configuration, pid file, logs and temporary folders under
    ``<workdir>/proxy/``. Stopping ``procs`` stops the master and its workers.

    Parameters
    ----------
    procs
        The process set that owns nginx.
    listen_host, listen_port, upstream_port, cert, key, ca, upstream_name
        As for :func:`render_nginx_conf`.
    workdir
        The coordinator's work folder.
    timeout
        Seconds to wait until the proxy accepts connections.

    Raises
    ------
    FederationError
        When nginx is missing, the configuration is invalid, or nginx does not
        listen within ``timeout`` (with the end of its error log).
    """
    binary = nginx_binary()
    for what, path in (("certificate", cert), ("private key", key), ("CA certificate", ca)):
        if not path.is_file():
            raise FederationError(f"The proxy's {what} {path} does not exist")
    prefix = (workdir / "proxy").resolve()
    (prefix / "logs").mkdir(parents=True, exist_ok=True)
    (prefix / "temp").mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(render_nginx_conf(
        listen_host=listen_host, listen_port=listen_port, upstream_port=upstream_port, cert=cert, key=key, ca=ca,
        prefix=prefix, upstream_name=upstream_name, worker_user=_worker_user(),
    ))
    _check_conf(binary, prefix, conf)
    _check_can_listen(listen_host, listen_port)
    error_log = prefix / "logs" / "error.log"
    log_offset = error_log.stat().st_size if error_log.is_file() else 0
    proxy = procs.start("Fleet API proxy (nginx)", [*_nginx_cmd(binary, prefix, conf), "-g", "daemon off;"],
                        log_path=prefix / "logs" / "nginx.out")
    wildcard = {"0.0.0.0": LOOPBACK, "::": "::1", "[::]": "::1"}
    probe_host = wildcard.get(listen_host, listen_host.strip("[]"))

    def failed(why: str) -> FederationError:
        proxy.stop()
        tail = _errors_since(error_log, log_offset) or proxy.tail(3).replace("\n", " | ")
        return FederationError(
            f"The Fleet API proxy (nginx) {why} on {listen_host}:{listen_port}; "
            f"its error log {error_log} ends with: {tail or '(nothing)'}"
        )

    def listening() -> bool:
        if not proxy.running():
            raise failed("exited at start")
        return can_connect(probe_host, listen_port, timeout=0.5)

    try:
        wait_until(listening, timeout=timeout, interval=0.1, what="the Fleet API proxy to listen")
    except TimeoutError:
        raise failed(f"did not listen within {timeout:g} s") from None
    log.info("Fleet API proxy listening on https://%s:%s -> SuperLink 127.0.0.1:%s",
             listen_host, listen_port, upstream_port)
    return proxy
