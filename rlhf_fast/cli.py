"""The ``rlhf-fast`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import platform
import re
import sys
import warnings

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
    "ppo": "PPO / GRPO / RLOO against reward models and/or reward functions, prompts from JSONL",
    "rs": "rejection-sampling fine-tuning (Llama 2): best of K samples per prompt by reward, SFT on them, per round",
    "dpo": "DPO / IPO / SLiC / cDPO / rDPO / RPO / SimPO on prompt/chosen/rejected JSONL",
    "pipeline": "SFT -> RM -> PPO end to end (defaults: the embedded tiny model and task, offline, on CPU)",
}


def _stage(command: str):
    """-> (the stage's config dataclass, its train function)."""
    if command == "pipeline":
        from .train.pipeline import PipelineConfig as cls, run_pipeline as run
    elif command == "sft":
        from .train.sft import SFTConfig as cls, train_sft as run
    elif command == "rm":
        from .train.rm import RMConfig as cls, train_rm as run
    elif command == "rs":
        from .train.rs import RSConfig as cls, train_rs as run
    elif command == "dpo":
        from .train.dpo import DPOConfig as cls, train_dpo as run
    else:
        from .train.ppo import PPOConfig as cls, train_ppo as run
    return cls, run


def field_comments(cls) -> dict[str, str]:
    """The ``# comment`` beside each field of the dataclass ``cls`` and its bases in their source (a following line
    holding only a comment continues it): the fields' documentation, kept in one place."""
    names = {f.name for f in dataclasses.fields(cls)}
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):  # no source shipped: the fields are listed without comments
            continue
        last = None
        for line in source.splitlines():
            field = re.match(r"    (\w+)\s*:[^#]*(?:#\s*(.*))?$", line)
            more = re.match(r"\s+#\s*(.*)$", line)
            if field and field.group(1) in names:  # a stage's own default keeps the base's comment unless it has one
                last = field.group(1) if field.group(2) else None
                if last:
                    comments[last] = field.group(2).strip()
            elif more and last:
                comments[last] += " " + more.group(1).strip()
            else:
                last = None
    return comments


def default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _value(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    return '""' if v == "" else str(v)


def config_help(cls) -> str:
    """Every field of the stage's config with its default and its comment, as the --help epilog."""
    comments = field_comments(cls)
    lines = ["config fields (key=value anywhere on the line, or in --config YAML; shown with their defaults):"]
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory):  # the pipeline's stages
            left, text = f"{f.name}.FIELD=...", f"the {f.name} stage's fields (rlhf-fast {f.name} --help)"
        else:
            left, text = f"{f.name}={_value(default(f))}", comments.get(f.name, "")
        lines.append(f"  {left:28s} {text}".rstrip() if len(left) <= 28 else f"  {left}\n  {'':28s} {text}")
    return "\n".join(lines)


class _StageParser(argparse.ArgumentParser):
    """A stage's subcommand parser: its --help lists the config fields (imported only when help is asked for)."""

    stage = None

    def format_help(self) -> str:
        if self.stage:
            self.epilog = config_help(_stage(self.stage)[0])
        return super().format_help()


def format_summary(summary: dict, prefix: str = "") -> str:
    """A stage's result as ``key: value`` lines: nested values dotted, floats to 4 significant digits, None left
    out."""
    lines = []
    for k, v in summary.items():
        if isinstance(v, dict):
            lines += format_summary(v, f"{prefix}{k}.").splitlines()
        elif v is not None:
            lines.append(f"{prefix}{k}: {v:.4g}" if isinstance(v, float) else f"{prefix}{k}: {v}")
    return "\n".join(lines)


def _train(args) -> None:
    import transformers

    from .train import common, distributed

    transformers.logging.set_verbosity_error()  # keep the trainers' own progress bars and report readable
    transformers.logging.disable_progress_bar()

    cls, run = _stage(args.command)
    fields = {"model": args.model, "data": args.data, "out": args.out, "backend": args.backend,
              "fsdp": args.fsdp or None}
    cfg = common.load_config(cls, args.config, args.overrides, **fields)
    try:
        result = run(cfg, resume=args.resume)
        main = distributed.is_main()
    finally:
        distributed.shutdown()
    if args.command != "pipeline" and main:
        print(format_summary(result))


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"rlhf-fast: warning: {message}\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rlhf-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_StageParser)
    sub.add_parser("info", help="print versions, devices, built extensions and each op's backend")
    for name, help_text in TRAIN_COMMANDS.items():
        p = sub.add_parser(name, help=help_text, formatter_class=argparse.RawDescriptionHelpFormatter,
                           description=f"{help_text}. Any config field can be set as key=value (dotted for nested).")
        p.stage = name
        p.add_argument("--config", help="YAML config file (fields of the stage's config dataclass)")
        p.add_argument("--model", help="local model directory (transformers format); default: embedded tiny model")
        p.add_argument("--data", help="local JSONL file; default: the embedded synthetic task")
        p.add_argument("--out", help="output directory")
        p.add_argument("--backend", choices=_backend.BACKENDS, help="run every rlhf_fast op on this backend")
        p.add_argument("--resume", action="store_true", help="continue from the checkpoint in the output directory")
        p.add_argument("--fsdp", action="store_true",
                       help="under torchrun: shard parameters, gradients and optimizer state with FSDP2 (else DDP)")
        p.add_argument("--debug", action="store_true",
                       help="show the traceback of configuration and data errors (also RLHF_FAST_DEBUG=1)")
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
        return
    from .data import DataError
    from .train.common import ConfigError

    formatwarning, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        _train(args)
    except (ConfigError, DataError) as exc:  # the user's to fix: one line; anything else is a bug: its traceback
        if args.debug or os.environ.get("RLHF_FAST_DEBUG", "0") not in ("", "0"):
            raise
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike: rank 0 says it
            print(f"rlhf-fast {args.command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":
    main()
