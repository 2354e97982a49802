"""benchmarks/secagg.py's measuring parts, without a federation (seconds, not minutes).

The access-log parser is checked against what a real nginx, configured by
server/proxy.py, writes; the key mapping against Flower's own encoding.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import ssl
import subprocess
import sys
import threading
from pathlib import Path

from benchmarks.harness import MACHINE, CpuSampler, machine_cpu, tree_cpu
from benchmarks.secagg import _ACCESS, ACCESS_LOG, header_key
from common.processes import LOOPBACK, ProcessSet, free_port
from server.proxy import start_fleet_proxy
from tests.server.test_proxy import _write_pki, needs_nginx


def _ssh_public_key(folder: Path) -> tuple[Path, object]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())  # what `fl-server enroll` issues
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    path = folder / "site.pub"
    path.write_bytes(line + b" fedrad-site-A\n")
    return path, key.public_key()


def test_a_kits_key_maps_to_the_header_flower_sends(tmp_path: Path) -> None:
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    path, public = _ssh_public_key(tmp_path)
    assert header_key(path) == base64.b64encode(public_key_to_bytes(public)).decode("ascii")  # type: ignore[arg-type]


class _Upstream(http.server.BaseHTTPRequestHandler):
    """Stands in for the SuperLink: reads the whole body, answers 200."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@needs_nginx
def test_the_proxy_logs_request_size_time_and_key_and_the_benchmark_parses_it(tmp_path: Path) -> None:
    pki = _write_pki(tmp_path / "pki")
    key = header_key(_ssh_public_key(tmp_path)[0])
    port = free_port()
    body = b"x" * 1000
    upstream = http.server.ThreadingHTTPServer((LOOPBACK, 0), _Upstream)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(pki.cert, pki.key)
    upstream.socket = tls.wrap_socket(upstream.socket, server_side=True)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    with ProcessSet() as procs:
        start_fleet_proxy(
            procs, listen_host=LOOPBACK, listen_port=port, upstream_port=upstream.server_address[1],
            cert=pki.cert, key=pki.key, ca=pki.ca, workdir=tmp_path,
        )
        context = ssl.create_default_context(cafile=str(pki.ca))
        for method, path, headers in (
            ("POST", "/v1/fleet/push-object", {"flwr-public-key": key}),
            ("GET", "/health", {}),
        ):
            conn = http.client.HTTPSConnection(LOOPBACK, port, context=context, timeout=10)
            conn.request(method, path, body=body if method == "POST" else None, headers=headers)
            conn.getresponse().read()
            conn.close()
    upstream.shutdown()
    upstream.server_close()
    lines = (tmp_path / ACCESS_LOG).read_text().splitlines()
    assert len(lines) == 2
    fleet, other = (_ACCESS.search(line) for line in lines)
    assert fleet is not None and other is not None, lines
    assert fleet["uri"] == "/v1/fleet/push-object" and fleet["key"] == key and fleet["status"] == "200"
    assert int(fleet["length"]) > len(body) + len(key)  # request line + headers + body
    assert other["key"] == "-" and other["status"] == "403"
    assert float(fleet["msec"]) > 1.7e9
    assert "x" * 20 not in "".join(lines)  # never a body


def test_tree_cpu_counts_exited_children() -> None:
    import os

    before, machine = tree_cpu(os.getpid()), machine_cpu()
    subprocess.run(
        [sys.executable, "-c", "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"],
        check=True,
    )
    assert tree_cpu(os.getpid()) - before >= 0.25
    assert machine_cpu() >= machine + 0.25
    assert tree_cpu(2**22 + 12345) == 0.0  # above pid_max: never a process


def test_the_sampler_gives_each_trees_cpu_between_two_moments() -> None:
    import time

    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 2.5: pass"])
    sampler = CpuSampler({"child": child.pid})
    sampler.start()
    try:
        time.sleep(2.4)
    finally:
        sampler.stop()
        child.wait()
    assert len(sampler.samples) >= 2, sampler.samples
    first, last = sampler.samples[0][0], sampler.samples[-1][0]
    start, end = first + 0.25 * (last - first), last - 0.25 * (last - first)  # between samples: interpolated
    used = sampler.used(start, end)
    assert set(used) == {"child", MACHINE}
    assert 0.2 * (end - start) <= used["child"] <= 1.1 * (end - start)  # at most one busy core (a busy machine shares it)
    assert used[MACHINE] >= used["child"] * 0.9
    assert sampler.used(start - 100, end) == {}  # before the first sample: not measured


def test_worker_messages_groups_a_sites_answered_messages_by_round_window(tmp_path: Path) -> None:
    from benchmarks.harness import worker_messages

    (tmp_path / "logs").mkdir()
    rows = [{"at": 5.0, "app_cpu_s": 1.0}, {"at": 15.0, "app_cpu_s": 2.0}, {"at": 16.0, "ok": False},
            {"at": 25.0, "app_cpu_s": 3.0}]
    (tmp_path / "logs" / "worker.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = worker_messages(tmp_path, {2: (10.0, 20.0), 3: (20.0, 30.0)})
    assert {r: [m["app_cpu_s"] for m in ms] for r, ms in got.items()} == {2: [2.0], 3: [3.0]}
    assert worker_messages(tmp_path / "none", {2: (0.0, 1.0)}) == {2: []}
