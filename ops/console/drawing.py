"""Geometry for the inline SVG drawings: an identity graph on a circle, hourly bars. The
templates draw them (autoescaped); nothing here writes markup."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

MAX_NODES = 50
SIZE = 520
RADIUS = 190


def when(ts: float | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def graph_layout(graph: dict[str, Any]) -> dict[str, Any]:
    """Nodes (at most 50) evenly on a circle; links and refused links between them, each
    with its label (time, dataset, record id; a refusal's reason)."""
    nodes = graph.get("identities", [])[:MAX_NODES]
    centre = SIZE / 2
    placed: dict[str, dict[str, Any]] = {}
    n = max(len(nodes), 1)
    for i, node in enumerate(nodes):
        key = f"{node['namespace']}:{node['value']}"
        angle = 2 * math.pi * i / n - math.pi / 2
        radius = RADIUS if len(nodes) > 1 else 0
        placed[key] = {
            "key": key,
            "x": round(centre + radius * math.cos(angle), 1),
            "y": round(centre + radius * math.sin(angle), 1),
            "first_seen": when(node.get("first_seen")),
        }

    def edge(a: str, b: str, label: str) -> dict[str, Any] | None:
        pa, pb = placed.get(a), placed.get(b)
        if pa is None or pb is None:
            return None
        return {
            "x1": pa["x"],
            "y1": pa["y"],
            "x2": pb["x"],
            "y2": pb["y"],
            "mx": round((pa["x"] + pb["x"]) / 2, 1),
            "my": round((pa["y"] + pb["y"]) / 2, 1),
            "label": label,
        }

    links = [
        edge(e["a"], e["b"], f"{when(e['created_at'])} {e['dataset']} {e['record_id']}")
        for e in graph.get("links", [])
    ]
    refused = [
        edge(r["a"], r["b"], f"refused: {r['reason']} ({r['dataset']} {r['record_id']})")
        for r in graph.get("refused", [])
    ]
    return {
        "size": SIZE,
        "nodes": list(placed.values()),
        "links": [x for x in links if x is not None],
        "refused": [x for x in refused if x is not None],
        "total": len(graph.get("identities", [])),
        "shown": len(placed),
    }


def bars(entered: list[int], exited: list[int]) -> dict[str, Any] | None:
    """24 hourly pairs of bars, entered up and exited down from a middle line."""
    if not entered and not exited:
        return None
    hours = max(len(entered), len(exited))
    entered = [*entered, *[0] * (hours - len(entered))]
    exited = [*exited, *[0] * (hours - len(exited))]
    peak = max([*entered, *exited, 1])
    width, half, step = 240, 24, 240 / max(hours, 1)
    out = []
    for i in range(hours):
        up = round(half * entered[i] / peak, 1)
        down = round(half * exited[i] / peak, 1)
        out.append(
            {
                "x": round(i * step, 1),
                "w": round(max(step - 1, 1), 1),
                "up": up,
                "down": down,
                "entered": entered[i],
                "exited": exited[i],
                "ago": hours - i,
            }
        )
    return {
        "width": width,
        "height": 2 * half,
        "mid": half,
        "bars": out,
        "entered": sum(entered),
        "exited": sum(exited),
    }
