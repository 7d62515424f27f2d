"""Timing, peak-memory and table helpers shared by the benchmark scripts."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date

import torch
from tabulate import tabulate


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, *, reps: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``reps`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_mib(fn, device: torch.device) -> float:
    """Peak memory ``fn()`` allocates beyond what is live before it, in MiB.

    CUDA: the caching allocator's peak statistic. CPU: the process's peak resident set (VmHWM, reset through
    /proc/self/clear_refs) minus the resident set before the call; large CPU tensors are mmap-ed, so this counts
    every temporary that is touched.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = rss_kib("VmRSS")
    fn()
    return max(0, rss_kib("VmHWM") - before) / 1024


HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}  # datasheet peaks


def hbm_fraction(device: torch.device, bytes_moved: float, ms: float) -> float | None:
    """Fraction of the GPU's datasheet memory bandwidth that moving ``bytes_moved`` in ``ms`` reaches (None on CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((bw for key, bw in HBM_BYTES_PER_S.items() if key in name), None)
    return None if peak is None else bytes_moved / (ms * 1e-3) / peak


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run that checks the script works")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    return p


def report(title: str, rows: list[dict], args, device: torch.device) -> None:
    """Prints the table and, with --json, writes it with the device and date."""
    print(f"\n{title} — {device_name(device)}, torch {torch.__version__}, {date.today()}")
    print(tabulate(rows, headers="keys", floatfmt=".3g"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"title": title, "device": device_name(device), "torch": torch.__version__,
                       "date": str(date.today()), "rows": rows}, f, indent=1)
