"""Test-only Flower App components: fedrad's ClientApp and ServerApp with what a test installs.

No deployment loads this module: the project's components are ``client.app:app``
and ``server.app:app``. :func:`tests.e2e.support.copy_app` copies the project,
points the copy's components here (``tests.e2e.apps:client`` and
``tests.e2e.apps:server``) and writes the test's plan next to this module
(:data:`PLAN_FILE`). Flower bundles both into the run's FAB, so the plan
travels with the app to the SuperLink and to every SuperNode; nothing is read
from the environment.

The plan (JSON) may hold:

- ``"faults"``: ``{site: fault}`` for sites that misbehave on purpose after they
  trained (and booked the round in their ledger), in plain (``secagg=false``) runs:
  ``"nan"`` sends weights full of NaN, as a site with a numerical blow-up would;
  ``"slow:SECONDS"`` holds the answer ``SECONDS`` longer, as an overloaded site would.
- ``"inspect"``: an absolute folder where, in SecAgg+ runs, each site keeps the
  plaintext update it is about to mask (``plain-<site>-round<r>.npz``: the arrays
  and ``num_examples``) and the coordinator keeps every masked vector it receives
  (``masked-<site>-round<r>.npz``), so a test can compare the two.
- ``"sites"``: how many sites must be connected before fedrad's ServerApp starts, so
  that round 1 goes to every site however slowly each one starts (``min-sites`` would
  let round 1 start with the first two).
- ``"marker"``: an absolute folder where :data:`foreign`, the ClientApp of a coordinator
  that would abuse the sites, leaves what it read of each site's data folder.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from client.app import client_app
from common import records

if TYPE_CHECKING:
    from flwr.clientapp.typing import ClientAppCallable
    from flwr.serverapp import Grid

PLAN_FILE = "e2e-plan.json"
FAULTS = ("nan", "slow")
JOIN_TIMEOUT = 300.0  # s: how long the ServerApp waits for the plan's ``"sites"``
log = logging.getLogger("flwr")  # what a ClientApp process writes to the SuperNode's log


def plan() -> dict[str, Any]:
    """The plan the harness bundled with this app (empty when there is none)."""
    path = Path(__file__).with_name(PLAN_FILE)
    return json.loads(path.read_text()) if path.exists() else {}


def parse_fault(fault: str) -> tuple[str, float]:
    """``"nan"`` → ``("nan", 0.0)``; ``"slow:600"`` → ``("slow", 600.0)``."""
    kind, _, value = fault.partition(":")
    if kind not in FAULTS or (kind == "slow") != bool(value):
        raise ValueError(f"Expected a fault 'nan' or 'slow:SECONDS', but got {fault!r}")
    return kind, float(value) if value else 0.0


def _trained(reply: Message) -> bool:
    """A plain train reply that carries weights (not a decline, not an error)."""
    return not reply.has_error() and records.ARRAYS in reply.content.array_records


def fault_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """The fault the plan gives this site, applied to the weights it trained (plain runs)."""
    reply = call_next(msg, ctxt)
    site = str(ctxt.node_config.get("site", ""))
    fault = plan().get("faults", {}).get(site)
    if fault is None or msg.metadata.message_type != MessageType.TRAIN or not _trained(reply):
        return reply
    kind, seconds = parse_fault(fault)
    if kind == "nan":
        import numpy as np

        log.warning("FAULT INJECTED (test plan): site %s sends NaN weights", site)
        trained = reply.content[records.ARRAYS]
        reply.content[records.ARRAYS] = ArrayRecord(array_dict={
            k: Array.from_numpy_ndarray(np.full_like(a, np.nan) if np.issubdtype(a.dtype, np.floating) else a)
            for k, a in ((k, v.numpy()) for k, v in trained.items())
        })
    else:
        log.warning("FAULT INJECTED (test plan): site %s holds its answer %.0f s", site, seconds)
        time.sleep(seconds)
    return reply


def plaintext_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Keep the plaintext update the site hands to SecAgg+ for masking (``plain-<site>-round<r>.npz``)."""
    reply = call_next(msg, ctxt)
    folder = plan().get("inspect")
    if not folder or reply.has_error() or "fitres.parameters" not in reply.content.array_records:
        return reply
    import numpy as np
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import recorddict_to_fitins, recorddict_to_fitres

    fitres = recorddict_to_fitres(reply.content, keep_input=True)
    server_round = recorddict_to_fitins(msg.content, keep_input=True).config[records.SERVER_ROUND]
    site = fitres.metrics[records.SITE_NAME]
    arrays = parameters_to_ndarrays(fitres.parameters)
    np.savez(Path(folder) / f"plain-{site}-round{server_round}.npz", *arrays, num_examples=np.array(fitres.num_examples))
    return reply


class MaskedVectorTap:
    """The ServerApp's grid, keeping every masked vector the coordinator receives (``masked-<site>-round<r>.npz``)."""

    def __init__(self, grid: Grid, folder: Path) -> None:
        self._grid = grid
        self.folder = folder

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def pull_messages(self, message_ids: Any) -> list[Message]:
        import numpy as np
        from flwr.common import bytes_to_ndarray
        from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

        replies = list(self._grid.pull_messages(message_ids))
        for reply in replies:
            if reply.has_error():
                continue
            cfg = reply.content.config_records.get(RECORD_KEY_CONFIGS, {})
            if Key.MASKED_PARAMETERS not in cfg:
                continue
            site = reply.content.config_records["fitres.metrics"][records.SITE_NAME]
            vectors = [bytes_to_ndarray(b) for b in cfg[Key.MASKED_PARAMETERS]]  # type: ignore[union-attr]
            np.savez(self.folder / f"masked-{site}-round{reply.metadata.group_id}.npz", *vectors)
        return replies


def _foreign(msg: Message, context: Context) -> Message:
    """What a coordinator would make every site run if sites ran the code it ships: list the site's
    DICOM folder and leave the list in a marker file (or send it home in the reply)."""
    from flwr.app import ConfigRecord, RecordDict

    data = Path(str(context.node_config["data-dir"]))
    names = sorted(p.name for p in data.iterdir())
    Path(plan()["marker"], f"foreign-{context.node_config['site']}.txt").write_text("\n".join(names))
    return Message(RecordDict({"loot": ConfigRecord({"files": names})}), reply_to=msg)


client = client_app(mods=[fault_mod, plaintext_mod])
foreign = ClientApp()
foreign.train()(_foreign)
foreign.evaluate()(_foreign)
server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    """fedrad's ServerApp, once the plan's sites are connected, on a grid that keeps masked vectors if asked to."""
    from common.processes import wait_until
    from server.app import app as production

    sites = int(plan().get("sites", 0))
    wait_until(lambda: len(grid.get_node_ids()) >= sites, timeout=JOIN_TIMEOUT, interval=1.0,
               what=f"{sites} sites to connect")
    folder = plan().get("inspect")
    production(MaskedVectorTap(grid, Path(folder)) if folder else grid, context)  # type: ignore[arg-type]
