"""QMP's block queries: ``query-block``, ``query-named-block-nodes`` and ``query-blockstats``,
answered from the machine's block graph (:mod:`pyvmm.block.info` shapes the entries as QEMU 7.2)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pyvmm.block import info


def query_block(ctx: Any, args: Mapping[str, Any]) -> list:
    return info.query_block(ctx.machine.block_graph())


def query_named_block_nodes(ctx: Any, args: Mapping[str, Any]) -> list:
    return info.query_named_block_nodes(ctx.machine.block_graph(), flat=bool(args.get("flat", False)))


def query_blockstats(ctx: Any, args: Mapping[str, Any]) -> list:
    graph = ctx.machine.block_graph()
    if args.get("query-nodes", False):  # every node on its own, by node-name, no device fields
        return [{"node-name": s["node-name"], "stats": s["stats"]}
                for s in (info.node_stats(n) for n in graph.nodes.values())]
    return info.query_blockstats(graph)


def query_block_jobs(ctx: Any, args: Mapping[str, Any]) -> list:
    """pyvmm has no block jobs (no block-stream, block-commit, mirror or backup): none is running."""
    return []
