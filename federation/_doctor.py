"""``federation doctor``: what this machine, this install and a Ray cluster offer a federation.

Read-only: versions of the package and its dependencies, which extras are
installed, the limits that size a pool (CPUs, memory, open files, /dev/shm),
and, given a Ray address, the cluster's live nodes with their site labels.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

EXIT_OK = 0

_DEPENDENCIES = (
    "pydantic",
    "cloudpickle",
    "psutil",
    "structlog",
    "mirakuru",
    "numpy",
    "ray",
    "rich",
    "matplotlib",
)


def _version(distribution: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _extras() -> dict[str, bool] | None:
    """Each extra of the installed distribution, and whether all its requirements are installed."""
    import re
    from importlib import metadata

    try:
        meta = metadata.metadata("federation-executor")
        requirements = metadata.requires("federation-executor") or []
    except metadata.PackageNotFoundError:
        return None
    extras: dict[str, bool] = {name: True for name in meta.get_all("Provides-Extra") or []}
    for requirement in requirements:
        marker = re.search(r"""extra\s*==\s*["']([^"']+)["']""", requirement)
        if marker is None or marker.group(1) not in extras:
            continue
        name = re.match(r"[A-Za-z0-9._-]+", requirement)
        if name is not None and _version(name.group(0)) is None:
            extras[marker.group(1)] = False
    return extras


def doctor_report() -> dict[str, Any]:
    """What ``federation doctor`` prints, as a dictionary."""
    import multiprocessing
    import resource

    import psutil

    from . import __version__

    try:
        affinity: int | None = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        affinity = None
    memory = psutil.virtual_memory()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        shm = shutil.disk_usage("/dev/shm")
        shm_info: dict[str, Any] | None = {"total": shm.total, "free": shm.free}
    except OSError:
        shm_info = None
    from ._config import default_pool_size

    return {
        "federation": __version__,
        "location": str(Path(__file__).resolve().parent),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "start_method": multiprocessing.get_start_method(allow_none=True)
        or multiprocessing.get_context().get_start_method(),
        "worker_start": "spawn: fork+exec of the interpreter (default); "
        "forkserver: forked from a preloaded forkserver",
        "pidfd": hasattr(os, "pidfd_open"),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "default_pool_size": default_pool_size(),
        "memory_total": memory.total,
        "memory_available": memory.available,
        "open_files_limit": {"soft": soft, "hard": hard},
        "dev_shm": shm_info,
        "extras": _extras(),
        "packages": {name: _version(name) for name in _DEPENDENCIES},
    }


def _bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{size} B"  # pragma: no cover


def _limit(value: int) -> str:
    import resource

    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


def ray_nodes_report(address: str) -> dict[str, Any]:
    """The nodes of the Ray cluster at ``address``: id, address, site labels, resources."""
    from ._ray_cluster import import_ray, live_nodes, node_summary

    ray = import_ray()
    import logging

    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR, include_dashboard=False)
    except Exception as exc:  # noqa: BLE001 - Ray's errors become one line
        return {"address": address, "error": f"{type(exc).__name__}: {exc}"}
    try:
        return {"address": address, "nodes": [node_summary(node) for node in live_nodes()]}
    finally:
        ray.shutdown()


def _cmd_doctor(args: argparse.Namespace) -> int:
    report = doctor_report()
    address = getattr(args, "ray_address", None)
    if address is not None:
        report["ray_cluster"] = ray_nodes_report(address)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return EXIT_OK
    shm = report["dev_shm"]
    files = report["open_files_limit"]
    extras = report["extras"]
    lines = [
        ("federation", f"{report['federation']} ({report['location']})"),
        ("python", f"{report['python']} {report['implementation']} ({report['executable']})"),
        ("platform", report["platform"]),
        (
            "start method",
            f"{report['start_method']} (multiprocessing default); workers: {report['worker_start']}",
        ),
        ("pidfd", "yes" if report["pidfd"] else "no (deaths are noticed through the output pipe)"),
        ("cpus", f"{report['cpu_count']} ({report['cpu_affinity']} usable by this process)"),
        ("default pool size", str(report["default_pool_size"])),
        ("memory", f"{_bytes(report['memory_total'])} ({_bytes(report['memory_available'])} available)"),
        ("open files", f"{_limit(files['soft'])} (hard limit {_limit(files['hard'])})"),
        ("/dev/shm", f"{_bytes(shm['total'])} ({_bytes(shm['free'])} free)" if shm else "missing"),
        (
            "extras",
            "unknown (running from a source tree that is not installed; in the checkout: pip install .)"
            if extras is None
            else ", ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in sorted(extras.items()))
            or "none",
        ),
    ]
    for name, version in report["packages"].items():
        lines.append((name, version or "not installed"))
    width = max(len(key) for key, _ in lines)
    for key, value in lines:
        print(f"{key + ':':<{width + 1}} {value}")
    warnings = []
    if shm and shm["total"] < 256 * 2**20:
        warnings.append("/dev/shm is under 256 MiB: large arrays travel through it (in Docker: --shm-size)")
    if files["soft"] != -1 and 0 <= files["soft"] < 4096:
        warnings.append(
            "the open-files limit is low for large pools: every worker uses several pipes (ulimit -n)"
        )
    cluster = report.get("ray_cluster")
    if cluster is not None:
        _print_ray_nodes(cluster)
    for warning in warnings:
        print(f"warning: {warning}")
    return EXIT_OK


def _print_ray_nodes(cluster: dict[str, Any]) -> None:
    if "error" in cluster:
        print(f"ray cluster:  {cluster['address']}: could not connect: {cluster['error']}")
        return
    nodes = cluster["nodes"]
    print(f"ray cluster:  {cluster['address']}, {len(nodes)} live node(s)")
    for node in nodes:
        labels = ", ".join(f"{k}={v}" for k, v in sorted(node["labels"].items())) or "no labels"
        resources = ", ".join(
            f"{k}={v:g}"
            for k, v in sorted(node["resources"].items())
            if k not in ("memory", "object_store_memory")
        )
        head = " (head)" if node["head"] else ""
        print(f"  node {node['node_id'][:12]} {node['address']}{head}: {labels}; {resources or 'no CPUs'}")
