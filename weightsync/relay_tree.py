"""Relay trees, shared by both sides: the trainer plans which rollout forwards to which, so it sends
each byte once, and a relaying rollout names the rollouts below it when it reports their results."""

from __future__ import annotations

from collections.abc import Sequence

from weightsync.v1 import weightsync_pb2 as pb

__all__ = ["relay_tree", "subtree_addresses"]


def relay_tree(rollouts: Sequence[str], fanout: int) -> tuple[str, list[pb.RelayTarget]]:
    """The first rollout is the root; the rest hang below it, `fanout` per node, in breadth-first order.

    fanout 1 is a chain: with a rate-limited link per host, every link then carries each byte once
    and the chain pipelines, so N rollouts take about as long as one.
    """
    if fanout < 1:
        raise ValueError("relay fanout must be at least 1")
    nodes = [pb.RelayTarget(address=a) for a in rollouts]
    # Node i's children are nodes fanout*i+1 .. fanout*i+fanout; build bottom-up so copies are complete.
    for i in reversed(range(len(nodes))):
        children = nodes[fanout * i + 1 : fanout * i + 1 + fanout]
        nodes[i].downstream.extend(children)
    return rollouts[0], list(nodes[0].downstream)


def subtree_addresses(targets: Sequence[pb.RelayTarget]) -> list[str]:
    """Every rollout in the trees under `targets`, each tree's root before its descendants."""
    return [a for t in targets for a in (t.address, *subtree_addresses(t.downstream))]
