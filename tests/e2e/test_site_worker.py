"""The site worker on real processes: a site runs only the app it installed, in one warm process.

Real ``fl-server`` (SuperLink behind its TLS proxy) and ``fl-client`` processes on
127.0.0.1; each site's SuperNode runs with ``--isolation process`` and its messages are
taken by the site's worker (:mod:`client.worker`). A worker killed and started again:
``tests/e2e/test_federation.py``; SecAgg+ through warm workers over several rounds, and a
site restarted mid-run: ``tests/e2e/test_secure_federation.py`` and ``tests/e2e/test_faults.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.support import BIN, assert_all_stopped, copy_app, federation, run_cli

pytestmark = pytest.mark.e2e
SERVER_ARGS = ["--rounds", "1", "--image-size", "32", "--local-epochs", "1",
               "--run-config", "round-timeout=60 join-timeout=120 secagg-timeout=30"]
CLIENT_ARGS = ["-c", "image-size=32"]


def test_a_coordinator_that_ships_another_app_is_refused_by_every_site_and_none_of_it_runs(
        tiny_sites: Path, tmp_path: Path) -> None:
    # The coordinator submits a copy of the project whose ClientApp would list each site's DICOM
    # folder into a marker file and send the list home. The sites run fedrad's installed app.
    marker = tmp_path / "marker"
    marker.mkdir()
    app = copy_app(tmp_path / "app", marker=marker, client="tests.e2e.apps:foreign")
    with federation(tmp_path / "fed", ["A", "B"], tiny_sites, app=app, sites_run_app=False,
                    server_args=SERVER_ARGS, client_args=CLIENT_ARGS) as fed:
        fed.start()
        fed.wait(timeout=300, what="fl-server to end the refused run", until=lambda: not fed.server.running())
    assert_all_stopped(fed)
    assert list(marker.iterdir()) == []  # nothing of the foreign app ran at any site
    installed = json.loads(run_cli(str(BIN / "fl-client"), "apps", "--site", "A", "--json").stdout)["installed"]
    for site in ("A", "B"):
        site_log = (fed.logs / f"site-{site}.log").read_text()
        refusals = [line for line in site_log.splitlines() if f"site {site} refused run" in line]
        assert refusals and f"which runs app {installed['hash']}" in refusals[0], site_log[-2000:]
        assert not (fed.site_dir(site) / "flwr-home" / "apps").exists()  # no FAB was ever unpacked here
        assert "train message of run" not in site_log  # the installed app was not run for it either
    folder = fed.run_folder()
    assert folder is not None
    report = folder.read_report()
    failed = json.dumps(report["rounds"])
    for site in ("A", "B"):
        assert f"site {site} refused run" in failed and "is not approved at this site" in failed, failed[:2000]
