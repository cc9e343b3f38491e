"""The coordinator's executor over a Flower Grid: one ``train`` message per job, replies until the deadline.

Why not ``grid.send_and_receive``: a round must end as soon as every *reachable* site has answered, a
site whose SuperNode dies must be counted as missed without waiting for the deadline, and a site that
comes online while the round is running should still get its job. So the loop is push → pull → look at
the SuperLink's node table, every ``poll_s`` seconds:

* a site is sent its job once its SuperNode is online. A site is the node registered under its name
  (``flwr supernode register <key> --name <site>``): the name is bound to the site's public key on the
  SuperLink, so no other node can claim it. A node registered without a name gets no job (it would have
  to be believed on its own word) and is logged once;
* a reply (matched by ``reply_to_message_id``) becomes a :class:`SiteResult`, an error reply the error;
* a message whose node went offline, or was *re-activated after the push* (a restarted SuperNode never
  sees the message its dead predecessor had taken, and Flower only reports NODE_UNAVAILABLE for nodes that
  stay offline), is lost: the site misses the round;
* the round ends when nothing sent is outstanding — or, if nobody was online at all, at the deadline.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from nnunet_feddah.federation.jobs import SiteJob, SiteResult
from nnunet_feddah.flower import messages

TTL_MARGIN_S = 120.0  # a message outlives the round deadline, so a slow site's reply is still storable
MIN_REMAINING_S = 30.0  # a late-joining site is sent its job only while this much of the deadline is left


@dataclass
class _Sent:
    site: str
    node_id: int
    pushed_at: float


@dataclass
class _Node:
    node_id: int
    name: str
    activated_at: float

    @property
    def key(self) -> tuple[int, float]:
        """One activation of one node: a restarted SuperNode is a new key with the same node id."""
        return self.node_id, self.activated_at


@dataclass
class FlowerExecutor:
    """Callable as ``coordinator.run(executor)``; ``defaults`` go into every job (plan, work-dir, device)."""

    grid: Grid
    site_names: tuple[str, ...]
    defaults: Mapping[str, str]
    log: Callable[[str], None] = print
    poll_s: float = 1.0
    timings_file: Path | None = None
    _ignored: set[int] = field(default_factory=set)  # unnamed or unknown nodes already logged

    def __call__(self, jobs: Mapping[str, SiteJob], deadline_s: float) -> dict[str, SiteResult | str]:
        end = time.time() + deadline_s
        round_index = next(iter(jobs.values())).round
        results: dict[str, SiteResult | str] = {}
        sent: dict[str, _Sent] = {}  # train message id -> where it went
        pushed: set[str] = set()  # a site gets its job at most once per round
        while True:
            nodes = self._online()
            sites = self._sites(nodes, deadline_s)
            fresh = [s for s in jobs if s in sites and s not in pushed]
            if fresh and (not pushed or end - time.time() > min(MIN_REMAINING_S, deadline_s / 2)):
                self.log(f"round {round_index}: {'sending to' if not pushed else 'late join:'} " + " ".join(
                    f"{s}=node {sites[s].node_id}" for s in fresh))
                self._push([(jobs[s], sites[s]) for s in fresh], sent, deadline_s, round_index)
                pushed.update(fresh)
            self._pull(sent, results)
            self._drop_lost(sent, nodes, results)
            if pushed and not sent:
                break  # every reachable site has answered; offline sites miss this round
            if time.time() >= end:
                for x in sent.values():
                    results[x.site] = f"no reply within the round deadline of {deadline_s:.0f} s"
                break
            time.sleep(self.poll_s)
        for site in jobs:
            results.setdefault(site, "no SuperNode registered as this site was online during the round")
        return results

    # --- nodes ----------------------------------------------------------------------------------------
    def _online(self) -> dict[int, _Node]:
        """The SuperLink's online nodes (``get_nodes`` lists only those) with name and activation time."""
        return {int(info.node_id): _Node(int(info.node_id), str(getattr(info, "name", "") or ""),
                                         _timestamp(getattr(info, "last_activated_at", "")))
                for info in self.grid.get_nodes()}

    def _sites(self, nodes: Mapping[int, _Node], deadline_s: float) -> dict[str, _Node]:
        """site → its online node, by the name registered with the node's key (newest activation wins)."""
        sites: dict[str, _Node] = {}
        for node in nodes.values():
            if node.name not in self.site_names:
                if node.node_id not in self._ignored:
                    self._ignored.add(node.node_id)
                    registered = f"as {node.name!r}" if node.name else "without a name"
                    self.log(f"node {node.node_id} is registered {registered}, not as a site of this plan: it gets no "
                             f"job (register the site's key with `flwr supernode register <key> --name <site>`)")
                continue
            if node.name not in sites or sites[node.name].activated_at < node.activated_at:
                sites[node.name] = node
        return sites

    # --- messages -------------------------------------------------------------------------------------
    def _push(self, pairs: list[tuple[SiteJob, _Node]], sent: dict[str, _Sent], deadline_s: float,
              round_index: int) -> None:
        self._send([(job.site, messages.job_content(job, self.defaults), node) for job, node in pairs],
                   messages.TRAIN, str(round_index), deadline_s, sent)

    def _send(self, outgoing: list[tuple[str, RecordDict, _Node]], message_type: str, group_id: str,
              deadline_s: float, sent: dict[str, _Sent]) -> None:
        msgs = [Message(content, dst_node_id=node.node_id, message_type=message_type, group_id=group_id,
                        ttl=deadline_s + TTL_MARGIN_S) for _, content, node in outgoing]
        pushed_at = time.time()
        for (site, _, node), mid in zip(outgoing, self.grid.push_messages(msgs), strict=True):
            sent[mid] = _Sent(site, node.node_id, pushed_at)

    def _pull(self, sent: dict[str, _Sent], results: dict[str, SiteResult | str]) -> None:
        for x, reply in self._replies(sent):
            received = time.time()
            if reply.has_error():
                results[x.site] = f"Flower error {reply.error.code}: {reply.error.reason}"
                continue
            try:  # a reply is another machine's bytes: any decoding failure is that site's missed round
                results[x.site] = messages.result_from_content(reply.content)
                timing = messages.timing_from_content(reply.content)
            except Exception as exc:
                results[x.site] = f"malformed reply: {type(exc).__name__}: {exc}"
                continue
            self._record_timing(x, results[x.site], timing, received)

    def _replies(self, sent: dict[str, _Sent]) -> list[tuple[_Sent, Message]]:
        """The replies that arrived for what was sent (removed from ``sent``), with where each went."""
        if not sent:
            return []
        arrived = []
        for reply in self.grid.pull_messages(list(sent)):
            x = sent.pop(reply.metadata.reply_to_message_id, None)
            if x is not None:
                arrived.append((x, reply))
        return arrived

    # --- the fingerprint round ------------------------------------------------------------------------
    def ask(self, stage: str, requests: Mapping[str, Mapping[str, Any]], deadline_s: float) -> dict[str, Any]:
        """One fingerprint-round stage (:data:`nnunet_feddah.federation.plans_round.Ask`) over the Grid.

        Unlike a training round it waits for *every* site until the deadline — the plans are everyone's —
        sending each its request as soon as its SuperNode is online. A site that goes offline or restarts
        after taking its request is answered with the reason; the round then stops and is repeated next run.
        """
        end = time.time() + deadline_s
        replies: dict[str, Any] = {}
        sent: dict[str, _Sent] = {}
        while True:
            nodes = self._online()
            sites = self._sites(nodes, deadline_s)
            waiting = {x.site for x in sent.values()}
            fresh = [s for s in requests if s in sites and s not in replies and s not in waiting]
            if fresh:
                self.log(f"fingerprint round ({stage}): asking " + " ".join(f"{s}=node {sites[s].node_id}" for s in fresh))
                self._send([(s, messages.ask_content(stage, requests[s], self.defaults), sites[s]) for s in fresh],
                           messages.FINGERPRINT_ROUND, f"fingerprint-{stage}", deadline_s, sent)
            for x, reply in self._replies(sent):
                if reply.has_error():
                    replies[x.site] = f"Flower error {reply.error.code}: {reply.error.reason}"
                    continue
                try:
                    replies[x.site] = messages.answer_from_content(reply.content)
                except Exception as exc:
                    replies[x.site] = f"malformed reply: {type(exc).__name__}: {exc}"
            self._drop_lost(sent, nodes, replies)
            if all(s in replies for s in requests):
                return replies
            if time.time() >= end:
                for site in requests:
                    replies.setdefault(site, f"no answer within the round deadline of {deadline_s:.0f} s (its "
                                             f"SuperNode was {'online' if site in sites else 'never online'})")
                return replies
            time.sleep(self.poll_s)

    def _drop_lost(self, sent: dict[str, _Sent], nodes: Mapping[int, _Node],
                   results: dict[str, SiteResult | str]) -> None:
        for mid, x in list(sent.items()):
            node = nodes.get(x.node_id)
            if node is None:
                why = f"SuperNode {x.node_id} went offline during the round"
            elif node.activated_at > x.pushed_at:
                why = f"SuperNode {x.node_id} restarted during the round; the work it had taken was lost"
            else:
                continue
            del sent[mid]
            results[x.site] = why

    def _record_timing(self, x: _Sent, result: SiteResult | str, timing: Mapping[str, float],
                       received: float) -> None:
        """Where a round's wall time went, per site: Flower start-up, nnU-Net start-up, training, transfer."""
        if not isinstance(result, SiteResult) or not timing:
            return
        wall = result.metrics.get("wall_time_s") or {}
        handler = timing.get("handler_end", 0.0) - timing.get("handler_start", 0.0)
        row: dict[str, Any] = {
            "round": result.round, "site": result.site, "total_s": received - x.pushed_at,
            "clientapp_start_s": timing.get("process_start", x.pushed_at) - x.pushed_at,
            "clientapp_init_s": timing.get("handler_start", 0.0) - timing.get("process_start", 0.0),
            "handler_s": handler, "site_import_s": handler - result.seconds, "site_round_s": result.seconds,
            "trainer_setup_s": wall.get("setup") or 0.0, "train_s": wall.get("train") or 0.0,
            "validation_s": wall.get("validation") or 0.0,
            "reply_s": received - timing.get("handler_end", received),
        }
        self.log(f"round {result.round} {result.site}: {row['total_s']:.1f}s = ClientApp start "
                 f"{row['clientapp_start_s']:.1f}s + ClientApp init/download {row['clientapp_init_s']:.1f}s + "
                 f"nnU-Net import {row['site_import_s']:.1f}s + site round {result.seconds:.1f}s (trainer setup "
                 f"{row['trainer_setup_s']:.1f}s, train {row['train_s']:.1f}s, validation "
                 f"{row['validation_s']:.1f}s) + upload/poll {row['reply_s']:.1f}s")
        if self.timings_file is not None:
            with open(self.timings_file, "a") as fh:
                fh.write(json.dumps(row) + "\n")


def _timestamp(value: Any) -> float:
    """NodeInfo timestamps are ISO strings; '' (never activated) sorts first."""
    if not value:
        return 0.0
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return 0.0
