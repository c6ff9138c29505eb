#!/usr/bin/env python3
"""Checks the stack's Grafana files without a Grafana: the provisioning YAML, and of every
dashboard the structure Grafana needs and the stack relies on (a unique uid and title, panels
with ids, types, positions and targets, each target's PromQL, and every data source naming the
provisioned Prometheus by uid). Prints each dashboard's expressions with --exprs (one JSON
object a line), for promtool to parse and the stack's test to run.

    python3 deploy/compose/grafana/check_dashboards.py [--exprs] [GRAFANA_DIR]

Exit status 1, with every problem listed, if anything is wrong.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

PANEL_TYPES = {"timeseries", "stat", "table", "gauge", "bargauge", "text", "row"}


def provisioned(grafana: Path) -> tuple[dict[str, str], list[Path], list[str]]:
    """The data sources (uid -> type) and dashboard folders Grafana is told to load."""
    problems: list[str] = []
    sources: dict[str, str] = {}
    for path in sorted((grafana / "provisioning" / "datasources").glob("*.yml")):
        doc = yaml.safe_load(path.read_text())
        if not isinstance(doc, dict) or doc.get("apiVersion") != 1:
            problems.append(f"{path}: not a provisioning file (apiVersion: 1)")
            continue
        for ds in doc.get("datasources") or []:
            for field in ("name", "uid", "type", "url"):
                if not ds.get(field):
                    problems.append(f"{path}: data source {ds.get('name')!r} has no {field}")
            if ds.get("uid") in sources:
                problems.append(f"{path}: data source uid {ds['uid']!r} twice")
            sources[ds.get("uid")] = ds.get("type")
    folders: list[Path] = []
    for path in sorted((grafana / "provisioning" / "dashboards").glob("*.yml")):
        doc = yaml.safe_load(path.read_text())
        if not isinstance(doc, dict) or doc.get("apiVersion") != 1:
            problems.append(f"{path}: not a provisioning file (apiVersion: 1)")
            continue
        for provider in doc.get("providers") or []:
            where = (provider.get("options") or {}).get("path")
            if provider.get("type") != "file" or not where:
                problems.append(f"{path}: provider {provider.get('name')!r} is not a file provider with a path")
                continue
            # The container path the compose file mounts grafana/dashboards on.
            if where != "/var/lib/grafana/dashboards":
                problems.append(f"{path}: provider path {where} is not where docker-compose.yml mounts the dashboards")
            folders.append(grafana / "dashboards")
    if not sources:
        problems.append("no data source is provisioned")
    if not folders:
        problems.append("no dashboard provider is provisioned")
    return sources, folders, problems


def check_dashboard(path: Path, sources: dict[str, str]) -> tuple[dict, list[str]]:
    problems: list[str] = []
    try:
        board = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        return {}, [f"{path}: not JSON: {err}"]
    if not isinstance(board, dict):
        return {}, [f"{path}: not a dashboard object"]
    for field in ("uid", "title", "panels"):
        if not board.get(field):
            problems.append(f"{path}: no {field}")
    ids: set[int] = set()
    for panel in board.get("panels") or []:
        where = f"{path}: panel {panel.get('title')!r}"
        if not isinstance(panel.get("id"), int) or panel["id"] in ids:
            problems.append(f"{where}: missing or repeated id")
        ids.add(panel.get("id"))
        if panel.get("type") not in PANEL_TYPES:
            problems.append(f"{where}: unknown type {panel.get('type')!r}")
        grid = panel.get("gridPos") or {}
        if not all(isinstance(grid.get(k), int) for k in ("x", "y", "w", "h")) or grid.get("x", 0) + grid.get("w", 0) > 24:
            problems.append(f"{where}: gridPos must have integer x, y, w, h within 24 columns")
        if panel.get("type") in ("row", "text"):
            continue
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"{where}: no targets")
        for ds in [panel.get("datasource")] + [t.get("datasource") for t in targets]:
            if not isinstance(ds, dict) or ds.get("uid") not in sources:
                problems.append(f"{where}: data source {ds!r} is not a provisioned uid ({sorted(sources)})")
            elif ds.get("type") != sources[ds["uid"]]:
                problems.append(f"{where}: data source type {ds.get('type')!r}, provisioned as {sources[ds['uid']]!r}")
        refs = [t.get("refId") for t in targets]
        if len(set(refs)) != len(refs) or not all(refs):
            problems.append(f"{where}: refIds missing or repeated")
        for target in targets:
            if not isinstance(target.get("expr"), str) or not target["expr"].strip():
                problems.append(f"{where}: target {target.get('refId')} has no expr")
    return board, problems


def main(argv: list[str]) -> int:
    show_exprs = "--exprs" in argv
    args = [a for a in argv if a != "--exprs"]
    grafana = Path(args[0]) if args else Path(__file__).resolve().parent
    sources, folders, problems = provisioned(grafana)
    uids: dict[str, Path] = {}
    titles: dict[str, Path] = {}
    exprs = []
    boards = sorted(p for folder in folders for p in folder.glob("*.json"))
    if folders and not boards:
        problems.append(f"no dashboards in {folders[0]}")
    for path in boards:
        board, found = check_dashboard(path, sources)
        problems += found
        for key, seen in (("uid", uids), ("title", titles)):
            value = board.get(key)
            if value in seen:
                problems.append(f"{path}: {key} {value!r} also in {seen[value]}")
            seen[value] = path
        for panel in board.get("panels") or []:
            for target in panel.get("targets") or []:
                if isinstance(target.get("expr"), str):
                    exprs.append({"dashboard": path.name, "panel": panel.get("title"),
                                  "refId": target.get("refId"), "expr": target["expr"],
                                  "instant": bool(target.get("instant"))})
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    if show_exprs:
        for e in exprs:
            print(json.dumps(e))
    else:
        print(f"{len(boards)} dashboards, {len(exprs)} expressions, data sources {sorted(sources)}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
