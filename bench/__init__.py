"""Benchmarks; results with their commands in BENCHMARKS.md."""

import os
import platform
from pathlib import Path


def cpu_description() -> str:
    """``"<n> CPUs (<model name>)"`` of this machine, for a benchmark's machine line."""
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({cpu})"
