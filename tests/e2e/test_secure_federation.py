"""The secure federation on loopback: enrolled kits, TLS through the Fleet-only proxy, SecAgg+.

Real ``fl-server`` (SuperLink + nginx) and ``fl-client`` (SuperNode) processes.
Where a test compares what the coordinator saw with what it must not see, the
run uses the test's own app (``tests/e2e/apps.py``, submitted by fl-server from a
copy of the project): a mod makes each site keep the plaintext update it masks,
and the ServerApp's grid keeps every masked vector the coordinator receives.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from common.config import SecAggConfig
from common.flower import flower_bin, flower_env
from common.processes import ProcessSet, free_port
from tests.e2e.support import BIN, copy_app, fl_server, one_line_error, run_cli, wait_for_server

pytestmark = pytest.mark.e2e
SITES = ("A", "B", "C")


@pytest.fixture(scope="module")
def three_sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from simulations.synth import synthesize

    out = tmp_path_factory.mktemp("three-sites")
    synthesize(out, sites=list(SITES), images_per_site=40, seed=5, size=48)
    return out


def _enroll(workdir: Path, port: int, sites: tuple[str, ...] = SITES) -> None:
    for site in sites:
        proc = run_cli(str(BIN / "fl-server"), "enroll", "--site", site, "--workdir", str(workdir),
                       "--server-address", f"127.0.0.1:{port}")
        assert proc.returncode == 0, proc.stderr


class Federation:
    """fl-server and one fl-client per site, all in one ProcessSet."""

    def __init__(self, procs: ProcessSet, tmp: Path, data: Path, port: int, app: Path | None = None) -> None:
        """``app``: a copy of the project with the test app (:func:`copy_app`) for fl-server to run."""
        self.procs, self.tmp, self.data, self.port, self.app = procs, tmp, data, port, app
        self.workdir = tmp / "server"
        self.clients: dict[str, object] = {}

    def serve(self, *args: str) -> object:
        command, where = fl_server(self.app)
        server = self.procs.start(
            "fl-server",
            [*command, "--port", str(self.port), "--workdir", str(self.workdir), "--image-size", "32",
             "--local-epochs", "1", *args],
            log_path=self.tmp / "server.log", **where,
        )
        wait_for_server(self.port, server)
        return server

    def join(self, site: str, kit: Path | None = None, data: Path | None = None) -> object:
        client = self.procs.start(
            f"fl-client {site}",
            [str(BIN / "fl-client"), "--kit", str(kit or self.workdir / "kits" / site), "--data", str(data or self.data / site),
             "--workdir", str(self.tmp / f"site-{site}"), "--threads", "1", "-c", "image-size=32"],
            log_path=self.tmp / f"site-{site}.log",
        )
        self.clients[site] = client
        return client

    def report(self) -> tuple[Path, dict]:
        (run_dir,) = (self.workdir / "runs").iterdir()
        return run_dir, json.loads((run_dir / "report.json").read_text())


def _wait_until_done(server: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while server.running() and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(1)
    assert not server.running(), "run did not finish in time:\n" + server.tail(60)  # type: ignore[attr-defined]
    assert server.popen.returncode == 0, server.tail(60)  # type: ignore[attr-defined]


def _stages(site_workdir: Path) -> Iterator[dict]:
    path = site_workdir / "logs" / "secagg.jsonl"
    if path.exists():
        yield from (json.loads(line) for line in path.read_text().splitlines() if line.strip())


def test_secagg_over_tls_equals_plaintext_fedavg_and_the_coordinator_sees_only_masked_updates(
    three_sites: Path, tmp_path: Path
) -> None:
    from server.app.checkpoint import load_checkpoint

    port = free_port()
    inspect = tmp_path / "inspect"
    inspect.mkdir()
    fed = Federation(ProcessSet(), tmp_path, three_sites, port, copy_app(tmp_path / "app", inspect=inspect))
    _enroll(fed.workdir, port)
    with fed.procs:
        server = fed.serve("--rounds", "1", "--min-sites", "3", "-c", "batch-size=8")
        for site in SITES:
            fed.join(site)
        _wait_until_done(server, 420)

    run_dir, report = fed.report()
    assert report["status"] == "completed"
    assert report["transport"].startswith("tls") and "SecAgg+" in report["transport"]
    assert sorted(report["rounds"][0]["train"]["sites"]) == list(SITES)

    # The secure aggregate is plaintext FedAvg of the sites' updates, within the quantization tolerance.
    plain = {s: np.load(inspect / f"plain-{s}-round1.npz") for s in SITES}
    counts = {s: int(plain[s]["num_examples"]) for s in SITES}
    arrays = {s: [plain[s][f"arr_{i}"] for i in range(len(plain[s].files) - 1)] for s in SITES}
    total = sum(counts.values())
    fedavg = [sum(counts[s] * arrays[s][i] for s in SITES) / total for i in range(len(arrays["A"]))]
    state, _ = load_checkpoint(run_dir / report["rounds"][0]["checkpoint"])
    from common.models import build_model

    keys = list(build_model("fedrad-cnn", image_size=32, num_classes=2).state_dict())
    secure = [state[k].numpy() for k in keys]
    tolerance = SecAggConfig().tolerance(sites=3, total_examples=total)
    assert len(secure) == len(fedavg)
    worst = max(float(np.max(np.abs(a - b))) for a, b in zip(secure, fedavg, strict=True))
    assert worst <= tolerance, (worst, tolerance)
    # ...and not simply one site's update.
    assert all(max(float(np.max(np.abs(a - b))) for a, b in zip(secure, arrays[s], strict=True)) > 10 * tolerance for s in SITES)
    for s in SITES:
        assert report["rounds"][0]["train"]["sites"][s]["num-examples"] == counts[s]

    # What the coordinator received from each site is masked: uniform over the 2**32 modulus,
    # where an unmasked encoding would stay below the 2**22 quantization range.
    for s in SITES:
        masked = np.load(inspect / f"masked-{s}-round1.npz")
        values = np.concatenate([masked[k].ravel() for k in masked.files]).astype(np.float64)
        assert values.size >= sum(a.size for a in arrays[s])
        assert np.mean(values >= SecAggConfig().quantization_range) > 0.95
        assert 0.4 < np.mean(values >= 2**31) < 0.6

    # Hospitals spoke only to the Fleet API, over TLS through the proxy.
    access = (fed.workdir / "proxy" / "logs" / "access.log").read_text().splitlines()
    assert access and all('"POST /v1/fleet/' in line for line in access)
    # Each site's CPU for the protocol is small next to its training.
    for s in SITES:
        stages = list(_stages(tmp_path / f"site-{s}"))
        assert {st["stage"] for st in stages} == {"setup", "share_keys", "collect_masked_vectors", "unmask"}
        assert sum(st["secagg_cpu_s"] for st in stages) < sum(st["train_cpu_s"] for st in stages)


def test_a_site_killed_mid_round_the_round_completes_with_the_others(three_sites: Path, tmp_path: Path) -> None:
    port = free_port()
    fed = Federation(ProcessSet(), tmp_path, three_sites, port)
    _enroll(fed.workdir, port)
    with fed.procs:
        server = fed.serve("--rounds", "1", "--min-sites", "3",
                           "-c", "batch-size=8 fraction-evaluate=0.0 secagg-timeout=45.0")
        for site in SITES:
            fed.join(site)
        # C takes part in the key exchange, then its hospital goes offline before it sends its masked update.
        deadline = time.monotonic() + 300
        while not any(st["stage"] == "share_keys" for st in _stages(tmp_path / "site-C")):
            assert server.running() and time.monotonic() < deadline, server.tail(40)  # type: ignore[attr-defined]
            time.sleep(0.2)
        time.sleep(2)  # its key shares are on their way; it drops while the others train
        fed.clients["C"].stop()  # type: ignore[attr-defined]
        _wait_until_done(server, 300)

    _, report = fed.report()
    train = report["rounds"][0]["train"]
    assert report["status"] == "completed"
    assert sorted(train["sites"]) == ["A", "B"]
    assert "C" in train["failed"], train
    assert (fed.workdir / "runs").exists() and report["rounds"][0]["checkpoint"]


def test_only_enrolled_kits_of_our_ca_join_and_a_kit_reaches_only_the_fleet_api(three_sites: Path, tmp_path: Path) -> None:
    from server.enroll import Consortium

    port = free_port()
    fed = Federation(ProcessSet(), tmp_path, three_sites, port)
    _enroll(fed.workdir, port, ("A", "B"))
    with fed.procs:
        server = fed.serve("--rounds", "1", "--min-sites", "2")
        # X was enrolled, then removed while the server runs: its key no longer opens the door.
        _enroll(fed.workdir, port, ("X",))
        removed_kit = shutil.copytree(fed.workdir / "kits" / "X", tmp_path / "kit-X")
        proc = run_cli(str(BIN / "fl-server"), "remove", "--site", "X", "--workdir", str(fed.workdir))
        assert proc.returncode == 0 and "unregistered from the running server" in proc.stdout, proc.stdout + proc.stderr
        unenrolled = fed.join("X", kit=removed_kit, data=three_sites / "A")
        deadline = time.monotonic() + 90
        while unenrolled.running() and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(1)
        assert not unenrolled.running(), "an unenrolled key kept a SuperNode connected"  # type: ignore[attr-defined]
        assert unenrolled.popen.returncode != 0  # type: ignore[attr-defined]
        log = (tmp_path / "site-X.log").read_text()
        assert "Traceback" not in log, log[-2000:]
        errors = [line for line in log.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "not enrolled" in errors[0], log[-2000:]

        # A kit from another consortium's CA: refused before anything is sent, with a clear line.
        other = Consortium(tmp_path / "other").enroll("A", server_address=f"127.0.0.1:{port}")
        foreign = run_cli(str(BIN / "fl-client"), "--kit", str(other), "--data", str(three_sites / "A"),
                          "--workdir", str(tmp_path / "site-foreign"), "-c", "image-size=32")
        assert "not the one your kit trusts" in one_line_error(foreign)

        # A hospital holding a valid kit cannot register a node or start a run through its port.
        kit = fed.workdir / "kits" / "A"
        home = tmp_path / "hospital-flwr"
        env = flower_env(home)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "coord"\n\n[superlink.coord]\naddress = "127.0.0.1:{port}"\n'
            f'root-certificates = "{kit / "ca.crt"}"\n'
        )
        app = Path(__file__).resolve().parents[2]
        for args in (["supernode", "register", str(kit / "site.pub"), "coord"], ["ls", "coord"],
                     ["run", str(app), "coord"], ["supernode", "list", "coord"]):
            out = subprocess.run([flower_bin("flwr"), *args, "--format", "json"], env=env, capture_output=True,
                                 text=True, timeout=120, check=False)
            assert out.returncode != 0 or '"success": false' in out.stdout, (args, out.stdout, out.stderr)
        assert server.running()  # type: ignore[attr-defined]
    access = (fed.workdir / "proxy" / "logs" / "access.log").read_text()
    assert '"POST /v1/control/' in access and " 403 " in access
