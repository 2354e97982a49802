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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomli_w

from common.config import SecAggConfig
from common.flower import flower_bin, flower_env
from common.processes import LOOPBACK, wait_until
from common.runfolder import RunFolder
from simulations.federation import Federation
from tests.e2e.support import BIN, copy_app, federation, one_line_error, run_cli

pytestmark = pytest.mark.e2e
SITES = ("A", "B", "C")
SERVER_ARGS = ["--rounds", "1", "--image-size", "32", "--local-epochs", "1"]
CLIENT_ARGS = ["-c", "image-size=32"]


@pytest.fixture(scope="module")
def three_sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from simulations.synth import synthesize

    out = tmp_path_factory.mktemp("three-sites")
    synthesize(out, sites=list(SITES), images_per_site=40, seed=5, size=48)
    return out


def _stages(site_workdir: Path) -> Iterator[dict]:
    path = site_workdir / "logs" / "secagg.jsonl"
    if path.exists():
        yield from (json.loads(line) for line in path.read_text().splitlines() if line.strip())


@dataclass(frozen=True)
class SecureRun:
    """A finished SecAgg+ run: every site trained round 1; C went offline in round 2 after its key exchange."""

    fed: Federation
    inspect: Path
    """What the sites masked (``plain-*``) and what the coordinator received (``masked-*``), per round."""
    folder: RunFolder
    report: dict[str, Any]


@pytest.fixture(scope="module")
def secure_run(three_sites: Path, tmp_path_factory: pytest.TempPathFactory) -> SecureRun:
    """Two SecAgg+ rounds over TLS, with the test app keeping what was masked and what the coordinator saw.

    Round 1: all three sites. Round 2: C takes part in the key exchange, then its hospital goes
    offline before it sends its masked update; the others go on.
    """
    root = tmp_path_factory.mktemp("secure-run")
    inspect = root / "inspect"
    inspect.mkdir()
    app = copy_app(root / "app", inspect=inspect)
    # Each site's warm worker answers a SecAgg+ stage within seconds (the first training message included). C leaves
    # in round 2: its node is deactivated as it goes, so the coordinator hears at once that it will not answer
    # (secagg-timeout only bounds the wait for a site that falls silent without leaving).
    server_args = [*SERVER_ARGS, "--rounds", "2", "-c", "batch-size=8 fraction-evaluate=0.0 secagg-timeout=30.0"]
    with federation(root / "fed", SITES, three_sites, app=app, server_args=server_args,
                    client_args=CLIENT_ARGS) as fed:
        fed.start()
        server_log = fed.logs / "fl-server.log"
        key_exchange = "Round 2, SecAgg+ stage 'share keys': "
        # C's key shares reached the coordinator (the stage is over for everybody): it drops while the others train.
        fed.wait(timeout=600, what="round 2's key exchange", interval=0.2,
                 until=lambda: key_exchange in server_log.read_text())
        assert f"{key_exchange}3 of 3 sites answered" in server_log.read_text(), fed.server.tail(40)
        fed.clients.pop("C").stop()
        fed.wait(timeout=300)
        fed.check_exit()
    folder = fed.run_folder()
    assert folder is not None
    return SecureRun(fed=fed, inspect=inspect, folder=folder, report=folder.read_report())


def _fedavg_is_the_secure_aggregate(run: SecureRun, server_round: int, sites: tuple[str, ...]) -> dict[str, list]:
    """Plaintext FedAvg of the sites' updates equals the round's checkpoint (within the quantization tolerance),
    and is not simply one site's update; each site's plaintext update."""
    from common.models import build_model
    from server.app.checkpoint import load_checkpoint

    plain = {s: np.load(run.inspect / f"plain-{s}-round{server_round}.npz") for s in sites}
    counts = {s: int(plain[s]["num_examples"]) for s in sites}
    arrays = {s: [plain[s][f"arr_{i}"] for i in range(len(plain[s].files) - 1)] for s in sites}
    total = sum(counts.values())
    fedavg = [sum(counts[s] * arrays[s][i] for s in sites) / total for i in range(len(arrays[sites[0]]))]
    state, _ = load_checkpoint(run.folder.path / run.report["rounds"][server_round - 1]["checkpoint"])
    keys = list(build_model("fedrad-cnn", image_size=32, num_classes=2).state_dict())
    secure = [state[k].numpy() for k in keys]
    tolerance = SecAggConfig().tolerance(sites=len(sites), total_examples=total)
    assert len(secure) == len(fedavg)
    worst = max(float(np.max(np.abs(a - b))) for a, b in zip(secure, fedavg, strict=True))
    assert worst <= tolerance, (worst, tolerance)
    for s in sites:  # ...and not simply one site's update.
        assert max(float(np.max(np.abs(a - b))) for a, b in zip(secure, arrays[s], strict=True)) > 10 * tolerance
        assert run.report["rounds"][server_round - 1]["train"]["sites"][s]["num-examples"] == counts[s]
    return arrays


def test_secagg_over_tls_equals_plaintext_fedavg_and_the_coordinator_sees_only_masked_updates(
    secure_run: SecureRun,
) -> None:
    report = secure_run.report
    assert report["status"] == "completed"
    assert report["transport"].startswith("tls") and "SecAgg+" in report["transport"]
    assert sorted(report["rounds"][0]["train"]["sites"]) == list(SITES)

    # The secure aggregate is plaintext FedAvg of the sites' updates, within the quantization tolerance.
    arrays = _fedavg_is_the_secure_aggregate(secure_run, 1, SITES)

    # What the coordinator received from each site is masked: uniform over the 2**32 modulus,
    # where an unmasked encoding would stay below the 2**22 quantization range.
    for s in SITES:
        masked = np.load(secure_run.inspect / f"masked-{s}-round1.npz")
        values = np.concatenate([masked[k].ravel() for k in masked.files]).astype(np.float64)
        assert values.size >= sum(a.size for a in arrays[s])
        assert np.mean(values >= SecAggConfig().quantization_range) > 0.95
        assert 0.4 < np.mean(values >= 2**31) < 0.6

    # Hospitals spoke only to the Fleet API, over TLS through the proxy.
    fed = secure_run.fed
    access = (fed.server_dir / "proxy" / "logs" / "access.log").read_text().splitlines()
    assert access and all('"POST /v1/fleet/' in line for line in access)
    # Each site's CPU for the protocol is small next to its training.
    for s in SITES:
        stages = [st for st in _stages(fed.site_dir(s)) if str(st["round"]) == "1"]
        assert {st["stage"] for st in stages} == {"setup", "share_keys", "collect_masked_vectors", "unmask"}
        assert sum(st["secagg_cpu_s"] for st in stages) < sum(st["train_cpu_s"] for st in stages)


def test_a_site_killed_mid_round_the_round_completes_with_the_others(secure_run: SecureRun) -> None:
    report = secure_run.report
    train = report["rounds"][1]["train"]
    assert report["status"] == "completed"
    assert sorted(train["sites"]) == ["A", "B"]
    assert "C" in train["failed"], train
    assert report["rounds"][1]["checkpoint"]
    # The round's aggregate is FedAvg of the two updates that were unmasked: C's masks did not stay in it.
    _fedavg_is_the_secure_aggregate(secure_run, 2, ("A", "B"))


def _join_with(fed: Federation, site: str, kit: Path, data: Path) -> Any:
    """Start an fl-client of ``site`` with a kit of the test's choosing (not the enrolled one)."""
    return fed.procs.start(
        f"fl-client {site}",
        [str(BIN / "fl-client"), "--kit", str(kit), "--data", str(data), "--workdir", str(fed.site_dir(site)),
         "--threads", "1", *CLIENT_ARGS],
        log_path=fed.logs / f"site-{site}.log", env=fed.env,
    )


def test_only_enrolled_kits_of_our_ca_join_and_a_kit_reaches_only_the_fleet_api(three_sites: Path,
                                                                                 tmp_path: Path) -> None:
    from server.enroll import Consortium

    with federation(tmp_path / "fed", ("A", "B"), three_sites, server_args=SERVER_ARGS) as fed:
        for site in fed.sites:
            fed.enroll(site)
        server = fed.start_server()
        port = fed.port
        # X was enrolled, then removed while the server runs: its key no longer opens the door.
        removed_kit = shutil.copytree(fed.enroll("X"), tmp_path / "kit-X")
        proc = run_cli(str(BIN / "fl-server"), "remove", "--site", "X", "--workdir", str(fed.server_dir))
        assert proc.returncode == 0 and "unregistered from the running server" in proc.stdout, proc.stdout + proc.stderr
        unenrolled = _join_with(fed, "X", removed_kit, three_sites / "A")
        try:
            wait_until(lambda: not unenrolled.running(), timeout=90, what="the unenrolled site's fl-client to exit")
        except TimeoutError:
            raise AssertionError("an unenrolled key kept a SuperNode connected") from None
        assert unenrolled.popen.returncode != 0
        log = (fed.logs / "site-X.log").read_text()
        assert "Traceback" not in log, log[-2000:]
        errors = [line for line in log.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "not enrolled" in errors[0], log[-2000:]

        # A kit from another consortium's CA: refused before anything is sent, with a clear line.
        other = Consortium(tmp_path / "other").enroll("A", server_address=f"{LOOPBACK}:{port}")
        foreign = run_cli(str(BIN / "fl-client"), "--kit", str(other), "--data", str(three_sites / "A"),
                          "--workdir", str(tmp_path / "site-foreign"), *CLIENT_ARGS)
        assert "not the one your kit trusts" in one_line_error(foreign)

        # A hospital holding a valid kit cannot register a node or start a run through its port.
        kit = fed.kit("A")
        home = tmp_path / "hospital-flwr"
        env = flower_env(home)
        connection = {"address": f"{LOOPBACK}:{port}", "root-certificates": str(kit / "ca.crt")}
        (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": "coord", "coord": connection}}))
        app = Path(__file__).resolve().parents[2]
        for args in (["supernode", "register", str(kit / "site.pub"), "coord"], ["ls", "coord"],
                     ["run", str(app), "coord"], ["supernode", "list", "coord"]):
            out = subprocess.run([flower_bin("flwr"), *args, "--format", "json"], env=env, capture_output=True,
                                 text=True, timeout=120, check=False)
            assert out.returncode != 0 or '"success": false' in out.stdout, (args, out.stdout, out.stderr)
        assert server.running()
    access = (fed.server_dir / "proxy" / "logs" / "access.log").read_text()
    assert '"POST /v1/control/' in access and " 403 " in access
