"""The operator's command line: ``swapfs`` and what it needs (spawning the
daemon, checking mounts, swap areas)."""

from swapfs.cli import commands, mountcheck, spawn, swaparea
from swapfs.cli.commands import main
from swapfs.cli.swaparea import PAGE_CLUSTER, page_cluster

__all__ = [
    "PAGE_CLUSTER",
    "commands",
    "main",
    "mountcheck",
    "page_cluster",
    "spawn",
    "swaparea",
]
