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


TRAIN_COMMANDS = {
    "sft": "supervised fine-tuning on prompt/completion (or chat) JSONL",
    "rm": "reward model on prompt/chosen/rejected JSONL (Bradley-Terry)",
    "ppo": "PPO / GRPO / RLOO against a reward model, prompts from JSONL",
    "dpo": "DPO / IPO / SLiC / cDPO / rDPO / RPO / SimPO on prompt/chosen/rejected JSONL",
    "pipeline": "SFT -> RM -> PPO end to end (defaults: the embedded tiny model and task, offline, on CPU)",
}


def _train(args) -> None:
    import transformers

    from .train import common, distributed

    transformers.logging.set_verbosity_error()  # keep the trainers' own progress bars and report readable
    transformers.logging.disable_progress_bar()

    if args.command == "pipeline":
        from .train.pipeline import PipelineConfig as cls, run_pipeline as run
    elif args.command == "sft":
        from .train.sft import SFTConfig as cls, train_sft as run
    elif args.command == "rm":
        from .train.rm import RMConfig as cls, train_rm as run
    elif args.command == "dpo":
        from .train.dpo import DPOConfig as cls, train_dpo as run
    else:
        from .train.ppo import PPOConfig as cls, train_ppo as run
    fields = {"model": args.model, "out": args.out, "backend": args.backend, "fsdp": args.fsdp or None}
    if args.command != "pipeline":
        fields["data"] = args.data
    elif args.data:
        raise SystemExit("rlhf-fast pipeline: give the data files as sft_data=... rm_data=... ppo_data=...")
    cfg = common.load_config(cls, args.config, args.overrides, **fields)
    try:
        result = run(cfg, resume=args.resume)
        main = distributed.is_main()
    finally:
        distributed.shutdown()
    if args.command != "pipeline" and main:
        print(result)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rlhf-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print versions, devices, built extensions and each op's backend")
    for name, help_text in TRAIN_COMMANDS.items():
        p = sub.add_parser(name, help=help_text,
                           description=f"{help_text}. Any config field can be set as key=value (dotted for nested).")
        p.add_argument("--config", help="YAML config file (fields of the stage's config dataclass)")
        p.add_argument("--model", help="local model directory (transformers format); default: embedded tiny model")
        p.add_argument("--data", help="local JSONL file; default: the embedded synthetic task")
        p.add_argument("--out", help="output directory")
        p.add_argument("--backend", choices=_backend.BACKENDS, help="run every rlhf_fast op on this backend")
        p.add_argument("--resume", action="store_true", help="continue from the checkpoint in the output directory")
        p.add_argument("--fsdp", action="store_true",
                       help="under torchrun: shard parameters, gradients and optimizer state with FSDP2 (else DDP)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (OmegaConf dotlist)")
    args, rest = parser.parse_known_args(argv)
    # key=value overrides may also follow the flags (e.g. appended after --out)
    unknown = [a for a in rest if "=" not in a or a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if rest:
        args.overrides = [*getattr(args, 'overrides', []), *rest]
    if args.command == "info":
        print(info())
    else:
        _train(args)


if __name__ == "__main__":
    main()
