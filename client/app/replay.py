"""The site's last trained update per run, so a round the coordinator lost is not paid for twice.

When the coordinator crashes after a site trained round *r* but before the round was committed,
``fl-server --resume`` sends round *r* again with the very same global weights. Training again would
be a second release of the site's data (fresh DP noise), charged twice. Instead the site keeps the
update it sent, with the digest of the weights it started from (latest round per run only). The same
round asked for again with the same weights gets that stored update again: re-sending an output
already released and booked costs no privacy (post-processing). Anything else is trained again and
booked again, as an honest second row (``docs/resilience.md``). The stored update never leaves the
site except as the reply it already was.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.files import write_atomic

if TYPE_CHECKING:
    import torch

    StateDict = OrderedDict[str, torch.Tensor]

log = logging.getLogger(__name__)
UPDATES_DIR = "updates"


def weights_digest(weights: StateDict) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a state dict, in order."""
    h = hashlib.sha256()
    for name, tensor in weights.items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


class UpdateStore:
    """``<work-dir>/updates/``: the last update this site trained in each run."""

    def __init__(self, work_dir: Path) -> None:
        self.folder = work_dir / UPDATES_DIR

    def _path(self, run_id: str, server_round: int) -> Path:
        return self.folder / f"{run_id}-round-{server_round:04d}.safetensors"

    def save(self, *, run_id: str, server_round: int, started_from: str, weights: StateDict,
             metrics: dict[str, Any], facts: dict[str, Any]) -> Path:
        """Keep this round's update (atomically) and drop the run's earlier rounds.

        Parameters
        ----------
        run_id
            The run the update belongs to, as the ledger books it.
        server_round
            The round the update answered.
        started_from
            :func:`weights_digest` of the global weights training started from; :meth:`load` compares it.
        weights
            The trained weights sent to the coordinator (stored from CPU copies).
        metrics, facts
            The reply's numbers and non-numeric facts, as :func:`client.app.site.train_round` returns
            them; stored as JSON so that a replay sends the very same reply.

        Returns
        -------
        Path
            The stored file, ``<work-dir>/updates/<run_id>-round-NNNN.safetensors``.
        """
        from safetensors.torch import save

        path = self._path(run_id, server_round)
        tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
        meta = {"started-from": started_from, "order": json.dumps(list(weights)),
                "metrics": json.dumps(metrics), "facts": json.dumps(facts)}
        write_atomic(path, save(tensors, metadata=meta))
        for old in self.folder.glob(f"{run_id}-round-*.safetensors"):
            if old != path:
                old.unlink(missing_ok=True)
        return path

    def load(self, *, run_id: str, server_round: int, started_from: str
             ) -> tuple[StateDict, dict[str, Any], dict[str, Any]] | None:
        """The stored update of this round if it was trained from the same weights, else None.

        Parameters
        ----------
        run_id, server_round
            The run and round the coordinator asks for again.
        started_from
            :func:`weights_digest` of the global weights it sent this time.

        Returns
        -------
        tuple or None
            ``(weights, metrics, facts)`` as :meth:`save` stored them; None when no update of this round
            is stored, it was trained from other weights, or its file is unreadable (logged as a warning).
        """
        from safetensors import SafetensorError, safe_open

        path = self._path(run_id, server_round)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                if meta.get("started-from") != started_from:
                    return None
                weights = OrderedDict((k, f.get_tensor(k)) for k in json.loads(meta["order"]))
            return weights, json.loads(meta["metrics"]), json.loads(meta["facts"])
        except (OSError, ValueError, KeyError, SafetensorError) as exc:
            log.warning("Stored update %s is unreadable (%s); training the round again", path, exc)
            return None
