"""The site's side of secure aggregation (Flower's SecAgg+).

Fit instructions arrive in Flower's legacy format (``fitins.*``), the reply goes back as
``fitres.*``, and Flower's ``secaggplus_mod`` masks the reply's weights before anything leaves the
site: the coordinator only ever unmasks the weighted sum over sites. The mod clips
``num-examples / max-weight × weights`` to ±``clipping-range`` silently, so the site refuses such
an update with a clear reason first (:func:`check_bounds`). A site that declines a round still
takes part (zero weights, weight 0), so the others' masks cancel.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import Context, Message, MessageType, RecordDict

from common import records
from common.config import SecAggConfig
from common.errors import UpdateOutOfRange

if TYPE_CHECKING:
    import numpy as np
    import torch

    StateDict = OrderedDict[str, torch.Tensor]

log = logging.getLogger(__name__)


def is_legacy_fit(content: RecordDict) -> bool:
    """Whether a train message carries legacy fit instructions (the SecAgg+ path)."""
    return records.FITINS_PARAMETERS in content.array_records


def read_fitins(content: RecordDict, keys: list[str]) -> tuple[StateDict, dict[str, Any]]:
    """The global weights (named by the model's state-dict keys) and the fit config."""
    import torch

    from common.adapters.flower import read_fit_instructions

    arrays, config = read_fit_instructions(content)
    if len(arrays) != len(keys):
        raise UpdateOutOfRange(
            f"The coordinator sent {len(arrays)} arrays for a model with {len(keys)}; "
            "the run's model does not match this site's fedrad version"
        )
    weights = OrderedDict((k, torch.from_numpy(a.copy())) for k, a in zip(keys, arrays, strict=True))
    return weights, config


def check_bounds(arrays: list[np.ndarray], *, num_examples: int, secagg: SecAggConfig) -> None:
    """Refuse an update the SecAgg+ encoding would clip or overflow.

    Parameters
    ----------
    arrays
        The trained weights the reply will carry, one array per state-dict entry.
    num_examples
        Training images behind the update (the reply's ``num-examples``); SecAgg+ scales the weights by
        ``num_examples / max-weight``.
    secagg
        The run's SecAgg+ encoding (``secagg-max-weight``, ``secagg-clipping-range``).

    Raises
    ------
    UpdateOutOfRange
        When ``num_examples`` exceeds ``secagg-max-weight``, a scaled weight lies outside
        ±``secagg-clipping-range``, or a weight is not finite.
    """
    import numpy as np

    if num_examples > secagg.max_weight:
        raise UpdateOutOfRange(
            f"this site trained on {num_examples} images, more than the run's secagg-max-weight "
            f"{secagg.max_weight}; ask the coordinator to raise secagg-max-weight"
        )
    ratio = num_examples / secagg.max_weight
    largest = max((float(np.max(np.abs(a))) for a in arrays if a.size), default=0.0)
    if not np.isfinite(largest):
        raise UpdateOutOfRange("the trained weights are not finite; the update is not sent")
    if largest * ratio > secagg.clipping_range:
        raise UpdateOutOfRange(
            f"a trained weight ({largest:.3g}) lies outside the run's secagg-clipping-range "
            f"±{secagg.clipping_range:g} and would be clipped; ask the coordinator to raise it"
        )


def secure_mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
    """Flower's ``secaggplus_mod`` for SecAgg+ train messages; other messages pass through.

    Also measures the CPU time the protocol costs this site (everything the mod
    does except the training it calls) and appends it, per stage, to
    ``<work-dir>/logs/secagg.jsonl`` on the site (numbers only).

    Parameters
    ----------
    msg
        The incoming message; only a train message carrying a SecAgg+ stage goes through the protocol.
    ctxt
        The ClientApp's context; the timing log goes under its node config's ``work-dir`` (none without one).
    call_next
        The next mod, or the handler: ``(Message, Context) -> Message``.

    Returns
    -------
    Message
        The reply of the protocol's stage (the masked update for the stage that trains), or ``call_next``'s.
    """
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctxt)
    from common.adapters.flower import secaggplus_stage

    stage = secaggplus_stage(msg.content)
    if stage is None:
        return call_next(msg, ctxt)
    from flwr.client.mod import secaggplus_mod

    inner = [0.0]

    def timed_next(m: Message, c: Context) -> Message:
        start = time.process_time()
        try:
            return call_next(m, c)
        finally:
            inner[0] += time.process_time() - start

    cpu0, wall0 = time.process_time(), time.perf_counter()
    reply = secaggplus_mod(msg, ctxt, timed_next)
    cpu = time.process_time() - cpu0 - inner[0]
    _record_stage(ctxt, msg, stage=stage, secagg_cpu=cpu, train_cpu=inner[0], wall=time.perf_counter() - wall0)
    return reply


def _record_stage(ctxt: Context, msg: Message, *, stage: str, secagg_cpu: float, train_cpu: float, wall: float) -> None:
    log.info("SecAgg+ stage %s: %.3f s CPU for the protocol, %.3f s CPU training", stage, secagg_cpu, train_cpu)
    work_dir = ctxt.node_config.get("work-dir")
    if not work_dir:
        return
    line = {
        "run": int(ctxt.run_id), "round": msg.metadata.group_id, "stage": stage,
        "secagg_cpu_s": round(secagg_cpu, 6), "train_cpu_s": round(train_cpu, 6), "wall_s": round(wall, 6),
    }
    path = Path(str(work_dir)) / "logs" / "secagg.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(line) + "\n")
