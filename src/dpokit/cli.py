"""``dpokit <command>``: one small function per command; the work happens in the library.

Every expected failure (bad config, bad data, missing model) ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dpokit.errors import DpokitError


def cmd_data_check(args: argparse.Namespace) -> int:
    from dpokit.data.check import run_check

    return run_check(args.source, model=args.model, max_length=args.max_length,
                     max_prompt_length=args.max_prompt_length)


def cmd_train(args: argparse.Namespace) -> int:
    from dpokit.train import train

    run_dir = train(args.config, args.overrides, resume=args.resume, force=args.force)
    print_before_after(run_dir)
    print(f"run directory: {run_dir}")
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from dpokit.train import train

    run_dir = train(args.config, args.overrides, resume=args.resume, force=args.force, task="sft")
    print(f"run directory: {run_dir}")
    return 0


def print_before_after(run_dir: Path) -> None:
    """The held-out metrics at step 0 and at the end, when the run evaluated."""
    from rich.console import Console
    from rich.table import Table

    from dpokit.metrics import read_metrics

    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("split") == "eval"]
    if len(rows) < 2:
        return
    before, after = rows[0], rows[-1]
    table = Table(title=f"held-out pairs: step {before['step']} -> step {after['step']}")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for name in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        table.add_row(name, f"{before[name]:.4f}", f"{after[name]:.4f}")
    Console().print(table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpokit", description="Direct Preference Optimization for causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="inspect preference data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    check = data_sub.add_parser("check", help="validate a preference file and audit its tokenization")
    check.add_argument("source", help="JSONL/JSON/CSV/Parquet file or hub dataset id")
    check.add_argument("--model", default="smollm2", help="model whose tokenizer and chat template to use")
    check.add_argument("--max-length", type=int, default=512)
    check.add_argument("--max-prompt-length", type=int, default=256)
    check.set_defaults(func=cmd_data_check)

    for name, func, text in (("train", cmd_train, "train with DPO (or a variant)"),
                             ("sft", cmd_sft, "supervised fine-tuning on the chosen responses (pi_SFT)")):
        command = sub.add_parser(name, help=text)
        command.add_argument("config", help="YAML config file")
        command.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-6 loss.beta=0.2")
        command.add_argument("--resume", action="store_true",
                             help="continue from the newest complete checkpoint in run_dir")
        command.add_argument("--force", action="store_true",
                             help="resume even though settings that change the result differ")
        command.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress display is enough
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DpokitError as exc:
        print(f"dpokit: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"dpokit: error: {exc.filename}: not found", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, permissions: the user's environment, not a bug to trace
        print(f"dpokit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dpokit: interrupted", file=sys.stderr)
        return 130
    except json.JSONDecodeError as exc:
        print(f"dpokit: error: invalid JSON ({exc})", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
