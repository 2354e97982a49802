"""The plain (no secure aggregation) round loop: deadlines, quorum, retries, screening, resume.

Flower's ``Strategy.start`` runs rounds with one timeout and averages whatever comes back; fedrad runs its
own loop over the same strategy hooks (:class:`server.app.strategy.FedradFedAvg` samples the sites):

1. **Join.** A round starts when ``min-sites`` sites are connected (else the run stops after
   ``join-timeout`` s); it samples the sites connected *then*, so a reconnected site rejoins.
2. **Deadline.** Training messages expire after ``round-timeout`` s (their Flower TTL): the round goes on
   with the answers so far; a site that picks up an expired message does not train it (no ε wasted).
3. **Screening.** :func:`server.app.validation.screen` rejects malformed updates and norm outliers,
   logged and reported with the site and the reason.
4. **Quorum.** At least ``min-sites`` useful answers (a screened update or a budget decline), one of them
   trained; else the round is retried up to ``round-retries`` times, then the run stops with the reason.
5. **Aggregation.** ``fedavg``, ``trimmed-mean`` or ``median`` (:func:`server.app.validation.aggregate`).
6. **Commit.** Checkpoint and report, then ``state.json`` (:mod:`server.app.resume`) for ``--resume``.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol, cast

from flwr.app import ArrayRecord, ConfigRecord, Message

from common import records
from common.config import RunConfig
from common.errors import FederationError
from common.processes import wait_until
from server.app.learning import finite_number
from server.app.strategy import FedradFedAvg, Names, RoundBook

if TYPE_CHECKING:
    import torch
    from flwr.serverapp import Grid

    StateDict = OrderedDict[str, torch.Tensor]

log = logging.getLogger(__name__)


class RoundShort(FederationError):
    """A round brought fewer usable answers than ``min-sites``."""


class RunStopped(FederationError):
    """The run cannot go on (too few sites, after the retries); the message says why."""


def wait_for_sites(grid: Grid, *, min_sites: int, timeout: float, server_round: int, poll: float = 1.0) -> list[int]:
    """The sorted ids of the connected nodes once at least ``min_sites`` are.

    Parameters
    ----------
    grid
        The ServerApp's grid, asked for its connected node ids every ``poll`` seconds.
    min_sites, timeout
        How many nodes must be connected (``min-sites``), and the seconds to wait for them (``join-timeout``).
    server_round
        The round about to start, for the log and the error message.

    Raises
    ------
    RunStopped
        When fewer than ``min_sites`` nodes are connected after ``timeout`` seconds (``join-timeout``).
    """
    seen: list[int] = []  # the nodes connected at the last look
    logged = [-1]  # how many were connected when that was last logged

    def enough() -> list[int] | None:
        seen[:] = sorted(grid.get_node_ids())
        if len(seen) >= min_sites:
            return list(seen)  # not empty: min-sites is at least 1
        if len(seen) != logged[0]:
            log.info("Round %d: waiting for sites: %d connected, %d needed", server_round, len(seen), min_sites)
            logged[0] = len(seen)
        return None

    try:
        return cast("list[int]", wait_until(enough, timeout=timeout, interval=poll, what="sites to join"))
    except TimeoutError:
        raise RunStopped(
            f"Round {server_round}: only {len(seen)} of the {min_sites} sites needed (min-sites) were connected "
            f"after waiting {timeout:g} s (join-timeout)"
        ) from None


def _expires(messages: Iterable[Message], ttl: float) -> list[Message]:
    """The messages with a TTL of the round deadline: after it the SuperLink drops them and their replies."""
    return [Message(content=m.content, dst_node_id=m.metadata.dst_node_id, message_type=m.metadata.message_type,
                    ttl=ttl, group_id=m.metadata.group_id) for m in messages]


def destinations(messages: list[Message]) -> dict[str, int]:
    """Message id → the node it was sent to (ids are set when the grid pushes the messages)."""
    return {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}


def origin(reply: Message, sent_to: dict[str, int]) -> int:
    """The node a reply is about: the SuperLink itself answers for an unreachable node
    ("Node Unavailable"), so go by the message it replies to."""
    return sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)


def _failure(reply: Message, timeout: float) -> str:
    """Why a site did not answer, in the coordinator's words (the SuperLink's errors for a
    message that expired unanswered, or a node that left or stopped sending heartbeats)."""
    from common.adapters.flower import undelivered

    why = undelivered(reply.error.code)
    if why == "expired":
        return f"no answer within the {timeout:g} s deadline (round-timeout)"
    if why == "node unavailable":
        return "connection lost: the site left, or stopped sending heartbeats (Node Unavailable)"
    return reply.error.reason


class RoundEngine(Protocol):
    """Runs rounds ``first..num-server-rounds``: :class:`PlainRounds` or :class:`server.app.secure.SecureRounds`."""

    def run_rounds(self, first: int, weights: StateDict) -> object:
        """Train, aggregate, evaluate and commit each round, starting from the global ``weights``."""


class PlainRounds:
    """Rounds ``first..num_rounds`` of a run without secure aggregation."""

    def __init__(self, grid: Grid, *, run: RunConfig, strategy: FedradFedAvg, names: Names,
                 on_round_done: Callable[[int, StateDict], None]) -> None:
        self.grid = grid
        self.run = run
        self.policy = run.rounds
        self.strategy = strategy
        self.names = names
        self.on_round_done = on_round_done

    def run_rounds(self, first: int, weights: StateDict) -> StateDict:
        """Rounds ``first..num-server-rounds`` from the global ``weights``; returns the final global weights."""
        for server_round in range(first, self.run.num_server_rounds + 1):
            log.info("[ROUND %d/%d]", server_round, self.run.num_server_rounds)
            weights, missed = self.train(server_round, weights)
            self.evaluate(server_round, weights, skip=missed)
            self.on_round_done(server_round, weights)
        return weights

    # -- training ----------------------------------------------------------------------------

    def train(self, server_round: int, weights: StateDict) -> tuple[StateDict, set[int]]:
        """One round's training with retries (RunStopped when it cannot be done): the new global weights (in the
        order of ``weights``), and the nodes that failed or missed the deadline (not asked to evaluate)."""
        attempts = self.policy.retries + 1
        for attempt in range(1, attempts + 1):
            wait_for_sites(self.grid, min_sites=self.run.min_sites, timeout=self.policy.join_timeout,
                           server_round=server_round)
            try:
                return self.train_once(server_round, weights)
            except RoundShort as exc:
                if attempt == attempts:
                    raise RunStopped(f"{exc}; gave up after {attempts} tries (round-retries={self.policy.retries})") from None
                log.warning("%s; trying round %d again (%d of %d)", exc, server_round, attempt + 1, attempts)
        raise AssertionError("unreachable")

    def train_once(self, server_round: int, weights: StateDict) -> tuple[StateDict, set[int]]:
        """One try of a round's training: send, screen, aggregate, close; like :meth:`train`.

        Raises
        ------
        RoundShort
            When fewer than ``min-sites`` sites answered usefully (an update that passed screening, or a
            decline), or no update passed; the try is booked in the report's ``attempts`` first.
        BudgetsSpent
            When every site that answered declined the round (and none failed or was rejected).
        """
        from server.app.validation import aggregate, screen

        config = ConfigRecord({"local-epochs": self.run.local_epochs})
        messages = _expires(
            self.strategy.configure_train(server_round, ArrayRecord(weights), config, self.grid), self.policy.timeout
        )
        started = time.monotonic()
        replies = list(self.grid.send_and_receive(messages, timeout=self.policy.timeout))
        log.info("Round %d: %d of %d sites answered in %.0f s", server_round, len(replies), len(messages),
                 time.monotonic() - started)
        book = RoundBook(server_round)
        sent_to = destinations(messages)
        missed = {m.metadata.dst_node_id for m in messages} - {origin(m, sent_to) for m in replies}
        missed |= {origin(m, sent_to) for m in replies if m.has_error()}  # not asked to evaluate either
        updates: dict[str, tuple[StateDict, int]] = {}
        answered: dict[str, int] = {}  # name -> the node that answered under it this round
        for msg in replies:
            node = origin(msg, sent_to)
            name = self.names.of(node, None if msg.has_error() else msg.content)
            if answered.get(name, node) != node:  # two live nodes claim one (unauthenticated) name: keep both
                name = f"{name}@node-{node}"
            answered[name] = node
            if msg.has_error():
                book.fail(name, _failure(msg, self.policy.timeout))
                continue
            metrics = msg.content.get(records.METRICS, {})
            site_record = msg.content.get(records.SITE, {})
            count = finite_number(metrics.get(records.NUM_EXAMPLES))  # it weighs the site's update
            if records.DECLINED not in site_record and (count is None or count < 0):
                book.reject(name, f"no usable example count ({metrics.get(records.NUM_EXAMPLES)!r})")
                continue
            if not book.reply(name, metrics, site_record):
                continue  # declined
            try:
                update = msg.content[records.ARRAYS].to_torch_state_dict()
            except Exception as exc:  # noqa: BLE001 - a reply is untrusted input: any decoding failure is a rejection
                book.reject(name, f"unreadable weights ({type(exc).__name__})")
                continue
            updates[name] = (update, int(metrics[records.NUM_EXAMPLES]))
        for node in sorted(missed - {origin(m, sent_to) for m in replies}):
            name = self.names.of(node)
            if name in answered:  # the site restarted: its old node is silent, its new one answered
                log.info("Round %d: site %s answered from node %d; its earlier node %d is gone", server_round,
                         name, answered[name], node)
                continue
            book.fail(name, f"no answer within the {self.policy.timeout:g} s deadline (round-timeout)")
        accepted, rejected = screen(updates, weights, norm_factor=self.policy.norm_factor)
        for name, reason in rejected.items():
            book.reject(name, reason)
        usable = len(accepted) + len(book.declined)
        if accepted and usable >= self.run.min_sites:
            method = self.policy.aggregation
            state = aggregate(list(accepted.values()), method=method, trim_fraction=self.policy.trim_fraction)
            book.close(self.strategy.report, state, aggregation=method)
            return OrderedDict((k, state[k]) for k in weights), missed
        if not accepted and book.declined and not book.failed and not book.rejected:
            book.close(self.strategy.report, None)  # every site declined: BudgetsSpent
        reason = (
            f"Round {server_round}: {len(accepted)} usable update(s) and {len(book.declined)} decline(s), "
            f"{self.run.min_sites} answers needed (min-sites)"
        )
        problems = {**book.failed, **book.rejected}
        if problems:
            reason += " (" + "; ".join(f"{k}: {v}" for k, v in sorted(problems.items())) + ")"
        self.strategy.report.record_attempt(server_round, reason=reason, failed=book.failed, rejected=book.rejected,
                                            declined=book.declined, trained=sorted(accepted))
        raise RoundShort(reason)

    # -- evaluation --------------------------------------------------------------------------

    def evaluate(self, server_round: int, weights: StateDict, *, skip: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        """Pooled evaluation of the new weights, booked in the report by :meth:`FedradFedAvg.aggregate_evaluate`.

        A site that does not answer within ``round-timeout``, or fails, costs a warning; the pooled metrics
        are of the sites that answered.

        Parameters
        ----------
        server_round, weights
            The round and the new global weights its training produced.
        skip
            Node ids not to ask: they missed the training deadline (most likely still busy). All: nothing booked.
        """
        messages = _expires(
            [m for m in self.strategy.configure_evaluate(server_round, ArrayRecord(weights), ConfigRecord(), self.grid)
             if m.metadata.dst_node_id not in skip],
            self.policy.timeout,
        )
        if not messages:
            return
        replies = list(self.grid.send_and_receive(messages, timeout=self.policy.timeout))
        sent_to = destinations(messages)
        answered = {origin(m, sent_to) for m in replies}
        for name in dict.fromkeys(self.names.of(m.metadata.dst_node_id) for m in messages
                                  if m.metadata.dst_node_id not in answered):  # one line per name, in message order
            log.warning("Round %d: %s did not evaluate: no answer within the %g s deadline (round-timeout)",
                        server_round, name, self.policy.timeout)
        for msg in replies:
            if msg.has_error():
                log.warning("Round %d: %s failed to evaluate: %s", server_round,
                            self.names.of(origin(msg, sent_to)), msg.error.reason)
        self.strategy.aggregate_evaluate(server_round, replies)
