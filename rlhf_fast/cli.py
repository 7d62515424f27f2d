"""The ``rlhf-fast`` command line."""

from __future__ import annotations

import argparse
import platform

import torch

from . import _backend
from .ops import OP_BACKENDS


def info() -> str:
    """What is built and usable here, and the backend each op would run on per device."""
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    lines = [
        f"rlhf_fast {__import__('rlhf_fast').__version__}, torch {torch.__version__}, python {platform.python_version()}",
        "devices: cpu" + "".join(f", cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())),
        f"requested backend: {_backend.requested_backend() or 'automatic'}",
        "backends:",
    ]
    lines += [f"  {name:7s} {_backend.availability(name)}" for name in _backend.BACKENDS]
    lines.append("op backends:")
    for op, implemented in OP_BACKENDS.items():
        chosen = []
        for device in devices:
            try:
                chosen.append(f"{device.type}={_backend.select(op, implemented, device)}")
            except RuntimeError as exc:
                chosen.append(f"{device.type}=error ({exc})")
        lines.append(f"  {op:22s} {', '.join(chosen)}   (implemented: {', '.join(implemented)})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rlhf-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print versions, devices, built extensions and each op's backend")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())


if __name__ == "__main__":
    main()
