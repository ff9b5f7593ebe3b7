"""``dpokit <command>``: one small function per command; the work happens in the library.

Every expected failure (bad config, bad data, missing model, a file that cannot be written) ends with one line
on stderr and exit code 2. A training command stopped by SIGTERM or SIGINT saves a checkpoint, prints where and
the command that resumes, and exits 128 + the signal's number: 143 (SIGTERM) or 130 (SIGINT).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from dpokit.errors import DpokitError, Preempted


def cmd_data_check(args: argparse.Namespace) -> int:
    return run_check(args.source, model=args.model, split=args.split, show=args.show,
                     max_length=args.max_length, max_prompt_length=args.max_prompt_length, on_error=args.on_error,
                     max_bad_fraction=args.max_bad_fraction, dedupe=False if args.no_dedupe else None,
                     max_line_bytes=args.max_line_bytes, max_rows=args.max_rows, num_proc=args.num_proc,
                     cache=False if args.no_cache else None, cache_dir=args.cache_dir, columns=_columns(args.column))


def run_check(source: str, model: str | None = None, *, split: str = "train", show: int = 0, console: Any = None,
              **settings: Any) -> int:
    """``dpokit data check``: load and tokenize ``source`` with ``model``'s tokenizer (default: the default of
    ``model.name_or_path``), print the report; 0 if any row is usable, else 1.

    ``settings`` are the ``data.*`` settings of the same names (None keeps a default); ``split`` is the split of
    a hub dataset (``owner/name`` or ``owner/name:config``) or of a JSON document; ``show``: print the first
    ``show`` kept groups decoded from the token ids training uses. The tokenized groups go into the data cache,
    so a training run with the same tokenizer and settings starts from them. Bad input raises
    :class:`dpokit.errors.DataError` (printed as one line).
    """
    from dpokit.config import ModelConfig
    from dpokit.data.cache import load_cached
    from dpokit.data.check import print_report, print_rows
    from dpokit.data.config import from_settings
    from dpokit.data.vision import load_vision
    from dpokit.models.loading import cache_dir, load_tokenizer, resolve
    from dpokit.models.vision import is_vision_source, load_processor
    from dpokit.terminal import console as make_console
    from dpokit.training.metrics import Progress

    data_cfg = from_settings(**settings)
    model = model or ModelConfig().name_or_path
    if is_vision_source(resolve(model)):  # rows with images, through the processor (held in memory)
        processor = load_processor(resolve(model))
        tokenizer = processor.tokenizer
        groups, report = load_vision(source, processor, data_cfg, split, want="any")
    else:
        tokenizer = load_tokenizer(resolve(model))
        groups, report = load_cached(source, tokenizer, data_cfg, split, want="any",
                                     note=lambda line: print(f"dpokit: {line}", file=sys.stderr), progress=Progress,
                                     cache_home=cache_dir())
    console = console or make_console()
    print_report(report, model, data_cfg, console)
    if show:
        print_rows(groups, tokenizer, show, console)
    return 0 if report.rows_kept > 0 else 1


def _columns(pairs: list[str] | None) -> dict[str, str] | None:
    """``--column prompt=question --column system=system`` -> ``data.columns``."""
    if not pairs:
        return None
    columns = {}
    for pair in pairs:
        target, sep, column = pair.partition("=")
        if not sep:
            raise DpokitError(f"--column {pair}: expected TARGET=COLUMN, e.g. prompt=question")
        columns[target.strip()] = column.strip()
    return columns


def launch_nproc(args: argparse.Namespace) -> None:
    """``--nproc N``: replace this process by torchrun running the same command on N local processes."""
    if args.nproc is None:
        return
    if args.nproc < 1:
        raise DpokitError("--nproc: expected a number of processes >= 1")
    if "RANK" in os.environ:
        raise DpokitError("--nproc: already running under torchrun; drop --nproc")
    from dpokit.config import load_config
    from dpokit.training.distributed import launch_command

    load_config(args.config, args.overrides)  # a bad config is one line here, not one per process
    argv = [args.command, args.config, *args.overrides]
    argv += ["--resume"] * args.resume + ["--force"] * args.force
    command = launch_command(args.nproc, argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(command[0], command)


def is_main_process() -> bool:
    """Rank 0 under torchrun, or a plain single process: the one that prints the summary."""
    return os.environ.get("RANK", "0") == "0"


def cmd_train(args: argparse.Namespace, task: str = "dpo") -> int:
    """``dpokit train`` (DPO), ``sft``, ``rm`` and ``ppo``: the same options, one library call
    (``dpokit.api.train``, which picks the kind of training by ``dpokit.training.kinds.choose_kind``)."""
    launch_nproc(args)
    from dpokit.api import train

    run_dir = train(args.config, args.overrides, resume=args.resume, force=args.force, task=task)
    if is_main_process():
        if task == "dpo":
            print_before_after(run_dir)
        print(f"run directory: {run_dir}")
    return 0


def resume_command(args: argparse.Namespace) -> str:
    """The command that continues a run this command stopped: the same one with ``--resume`` (``--force`` is
    not needed: the checkpoint holds this command's settings), on as many local processes under torchrun."""
    argv = ["dpokit", args.command, args.config, *args.overrides, "--resume"]
    world, local = os.environ.get("WORLD_SIZE", "1"), os.environ.get("LOCAL_WORLD_SIZE")
    if world != "1" and local == world:
        argv += ["--nproc", world]
    elif world != "1":
        return f"{shlex.join(argv)} (on every node, under torchrun as before)"
    return shlex.join(argv)


def print_before_after(run_dir: Path) -> None:
    """The held-out metrics at step 0 and at the end, when the run evaluated."""
    from rich.table import Table

    from dpokit.terminal import console
    from dpokit.training.metrics import read_metrics

    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("split") == "eval"]
    if len(rows) < 2:
        return
    before, after = rows[0], rows[-1]
    table = Table(title=f"held-out: step {before['step']} -> step {after['step']}")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for name in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "reward", "kl"):
        if name in before and name in after:  # online DPO evaluates its samples: reward and kl
            table.add_row(name, f"{before[name]:.4f}", f"{after[name]:.4f}")
    console().print(table)


def cmd_score(args: argparse.Namespace) -> int:
    from dpokit.evaluate.scoring import score

    score(args.model, args.file, ref=args.ref, beta=args.beta, out=args.out or "-", batch_size=args.batch_size)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from dpokit.evaluate.run import evaluate_run, parse_temperatures, print_summary
    from dpokit.rewards.judge import make_judge

    result = evaluate_run(
        args.run_dir, prompts=args.prompts, reward=args.reward, temperatures=parse_temperatures(args.temperatures),
        judge=make_judge(args.judge_url, args.judge_model, args.judge_key_env, seed=args.seed),
        n_samples=args.n_samples, max_new_tokens=args.max_new_tokens, top_p=args.top_p, seed=args.seed,
        max_prompts=args.max_prompts, batch_size=args.batch_size, frontier=not args.no_frontier,
        baseline=args.baseline, ref=args.ref, beta=args.beta)
    print_summary(result)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from dpokit.evaluate.report import write_report

    print(f"report: {write_report(args.run_dirs, out=args.out, max_samples=args.max_samples)}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from dpokit.serve import serve

    serve(args.run_dir, ref=args.ref, host=args.host, port=args.port, reward=args.reward, precision=args.precision,
          max_queue=args.max_queue, token=args.token or os.environ.get("DPOKIT_SERVE_TOKEN") or None, api=args.api)
    return 0


TO = "--to"
"""``--adapter`` given without a folder: the adapter goes into ``--to``'s."""


def cmd_export(args: argparse.Namespace) -> int:
    from dpokit.integrations.export import export_adapter, export_run

    if args.adapter is None:
        if args.to is None:
            raise DpokitError("dpokit export: give --to DIR (the model folder) or --adapter OUT (the LoRA adapter)")
        print(f"exported: {export_run(args.run_dir, args.to, checkpoint=args.checkpoint)}")
        return 0
    if args.adapter != TO and args.to is not None:
        raise DpokitError("dpokit export: --adapter OUT and --to DIR name two folders; give one")
    out = args.to if args.adapter == TO else args.adapter
    if out is None:
        raise DpokitError("dpokit export: --adapter needs a folder: --adapter OUT")
    path, gap = export_adapter(args.run_dir, out, checkpoint=args.checkpoint)
    measured = f"{gap:.3g}" if gap is not None else "not measured (a reward model, or a base given in memory)"
    print(f"adapter: {path}; max |Δlogit| on its base against the merged weights: {measured}")
    return 0


def cmd_config_from_trl(args: argparse.Namespace) -> int:
    from dpokit.integrations.from_trl import from_trl, render

    translation = from_trl(args.file, out=args.out)
    if args.out is None:
        print(render(translation, args.file), end="")
    else:
        print(f"wrote {args.out}")
    for key, reason in translation.unmapped.items():
        print(f"dpokit: not carried over: {key}: {reason}", file=sys.stderr)
    return 0


def cmd_recipe(args: argparse.Namespace) -> int:
    from dpokit.recipes import run_recipe

    run_recipe(args.name, preset=args.preset, overrides=args.overrides)
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    from dpokit.models.hardware import describe, format_env

    info = describe()
    print(json.dumps(info, indent=1) if args.json else format_env(info))
    return 0


def _add_data(sub: Any) -> None:
    """``dpokit data check``."""
    data = sub.add_parser("data", help="inspect preference data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    check = data_sub.add_parser("check", help="validate a preference file and audit its tokenization")
    check.add_argument("source", help="JSONL/JSON/CSV/Parquet file or hub dataset id")
    # Defaults None: the config's defaults apply (``model.name_or_path``, ``data.*``), stated there once.
    check.add_argument("--model", default=None, help="model whose tokenizer and chat template to use")
    check.add_argument("--max-length", type=int, default=None)
    check.add_argument("--max-prompt-length", type=int, default=None)
    check.add_argument("--on-error", choices=["raise", "skip"], default=None,
                       help="malformed rows: stop at the first (raise) or drop and count them (skip)")
    check.add_argument("--max-bad-fraction", type=float, default=None,
                       help="with --on-error skip: fail when more than this fraction of rows is malformed")
    check.add_argument("--no-dedupe", action="store_true", help="keep exact duplicate rows")
    check.add_argument("--max-line-bytes", type=int, default=None, help="reject JSONL lines longer than this")
    check.add_argument("--max-rows", type=int, default=None, help="read at most this many rows")
    check.add_argument("--num-proc", type=int, default=None,
                       help="processes that tokenize a JSONL file (default: the usable cores)")
    check.add_argument("--no-cache", action="store_true",
                       help="do not keep the tokenized data for later runs (data.cache: false)")
    check.add_argument("--cache-dir", default=None, help="data cache folder (default $DPOKIT_CACHE/data)")
    check.add_argument("--split", default="train",
                       help="split of a hub dataset (SOURCE owner/name or owner/name:config) or a JSON document")
    check.add_argument("--column", action="append", metavar="TARGET=COLUMN",
                       help="map a dataset column onto a dpokit name (data.columns), e.g. --column prompt=question")
    check.add_argument("--show", type=int, default=0, metavar="N",
                       help="print the first N groups decoded from the token ids training uses")
    check.set_defaults(func=cmd_data_check)


def _add_training(sub: Any) -> None:
    """``dpokit train``, ``sft``, ``rm`` and ``ppo``."""
    for name, task, text in (("train", "dpo", "train with DPO (or a variant)"),
                             ("sft", "sft", "supervised fine-tuning on the chosen responses (pi_SFT)"),
                             ("rm", "rm", "train a reward model (Bradley-Terry) on preference pairs"),
                             ("ppo", "ppo", "RLHF with PPO: sample, score with a reward, update against pi_ref")):
        command = sub.add_parser(name, help=text)
        command.add_argument("config", help="YAML config file")
        command.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-6 loss.beta=0.2")
        command.add_argument("--resume", action="store_true",
                             help="continue from the newest complete checkpoint in run_dir")
        command.add_argument("--force", action="store_true",
                             help="resume even though settings that change the result differ")
        command.add_argument("--nproc", type=int, metavar="N",
                             help="train on N local processes (GPUs): runs this command under torchrun")
        command.set_defaults(func=functools.partial(cmd_train, task=task))


def _add_score(sub: Any) -> None:
    """``dpokit score``."""
    score = sub.add_parser("score", help="implicit reward beta * log pi/pi_ref of (prompt, response) rows")
    score.add_argument("file", help="JSONL/JSON/CSV/Parquet rows: prompt + response | responses | chosen/rejected")
    score.add_argument("--model", required=True, help="run directory (uses its final/) or model folder")
    score.add_argument("--ref", help="reference model (default: the run's reference; required for a folder)")
    score.add_argument("--beta", type=float, help="default: the run's loss.beta")
    score.add_argument("--out", help="output JSONL (default: stdout)")
    score.add_argument("--batch-size", type=int, default=8)
    score.set_defaults(func=cmd_score)


def _add_eval(sub: Any) -> None:
    """``dpokit eval``."""
    ev = sub.add_parser("eval", help="samples, reward, KL, win rate, implicit-reward accuracy -> RUN_DIR/eval/")
    ev.add_argument("run_dir")
    ev.add_argument("--prompts", help="prompt file (default: the prompts of the run's data.eval)")
    ev.add_argument("--reward", help="ground-truth reward: sentiment, length, or module:function")
    ev.add_argument("--judge-url", help="OpenAI-compatible endpoint of an LLM judge, e.g. http://host:8000/v1")
    ev.add_argument("--judge-model", help="model name the judge endpoint serves")
    ev.add_argument("--judge-key-env", help="environment variable holding the judge's API key")
    ev.add_argument("--baseline", choices=["reference", "chosen"], default="reference",
                    help="win rate against pi_ref samples or the dataset's chosen responses")
    ev.add_argument("--temperatures", default="1.0", help="comma-separated sampling temperatures (1.0 always)")
    ev.add_argument("--n-samples", type=int, default=1, help="samples per prompt")
    ev.add_argument("--max-new-tokens", type=int, default=64)
    ev.add_argument("--top-p", type=float, default=1.0)
    ev.add_argument("--max-prompts", type=int, help="use at most this many prompts")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--no-frontier", action="store_true", help="skip the per-checkpoint reward-KL points")
    ev.add_argument("--ref", help="reference model (default: the run's reference)")
    ev.add_argument("--beta", type=float, help="default: the run's loss.beta")
    ev.set_defaults(func=cmd_eval)


def _add_report(sub: Any) -> None:
    """``dpokit report``."""
    report = sub.add_parser("report", help="one self-contained HTML page: curves, frontier, samples")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", help="HTML file (default: RUN_DIR/report.html; required for several runs)")
    report.add_argument("--max-samples", type=int, default=6, help="side-by-side samples shown per run")
    report.set_defaults(func=cmd_report)


def _add_serve(sub: Any) -> None:
    """``dpokit serve``."""
    from dpokit.serve import MAX_QUEUE  # the package itself imports nothing heavy
    serve = sub.add_parser("serve", help="local web page: a prompt, pi_ref and pi side by side, implicit rewards")
    serve.add_argument("run_dir", metavar="RUN_DIR")
    serve.add_argument("--ref", help="reference model (default: the run's reference)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=7860, help="port (0: any free port)")
    serve.add_argument("--reward", help="ground-truth reward shown too: sentiment, length, or module:function")
    serve.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                       help="sampling precision (auto: bf16 only where it is native; rewards are scored in fp32)")
    serve.add_argument("--max-queue", type=int, default=MAX_QUEUE,
                       help=f"requests waiting behind the running one; more get 503 with Retry-After "
                            f"(default {MAX_QUEUE})")
    serve.add_argument("--token", help="access token every request must carry (?token=, 'Authorization: Bearer' "
                                       "or X-Dpokit-Token); default: $DPOKIT_SERVE_TOKEN, else one made up and "
                                       "printed when --host is not loopback, none on loopback")
    serve.add_argument("--api", action="store_true",
                       help="also serve an OpenAI-compatible API under /v1 (models 'policy' and 'reference')")
    serve.set_defaults(func=cmd_serve)


def _add_env(sub: Any) -> None:
    """``dpokit env``."""
    env = sub.add_parser("env", help="versions, devices, measured fp32/bf16 speed and what 'auto' picks (for bug "
                                     "reports)")
    env.add_argument("--json", action="store_true", help="print JSON instead of text")
    env.set_defaults(func=cmd_env)


def _add_config(sub: Any) -> None:
    """``dpokit config from-trl``."""
    config = sub.add_parser("config", help="config tools")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    trl = config_sub.add_parser("from-trl", help="a TRL DPO config file (DPOConfig, ModelConfig and "
                                                 "script fields, as TrlParser reads them) as a dpokit config; "
                                                 "keys that cannot be mapped are named with the reason")
    trl.add_argument("file", help="YAML or JSON file of TRL's DPOConfig, ModelConfig and ScriptArguments fields")
    trl.add_argument("--out", help="write the dpokit config here (default: stdout)")
    trl.set_defaults(func=cmd_config_from_trl)


def _add_export(sub: Any) -> None:
    """``dpokit export``."""
    export = sub.add_parser("export", help="a run's model as a Hub-ready folder: weights, tokenizer, generation "
                                           "config, model card (no network)")
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("--to", metavar="DIR", help="the folder to write (must not exist or be empty)")
    export.add_argument("--checkpoint", metavar="step-N",
                        help="export this checkpoint instead of final/ (LoRA merged, or its adapter with --adapter)")
    export.add_argument("--adapter", nargs="?", const=TO, metavar="OUT",
                        help="a LoRA run's adapter alone, in peft's format, into OUT (or --to's folder), with the "
                             "largest logit difference between it on its base and the merged weights")
    export.set_defaults(func=cmd_export)


def cmd_plan(args: argparse.Namespace) -> int:
    from dpokit.plan import plan
    from dpokit.plan.advice import render

    result = plan(args.config, args.overrides, gpu_memory=args.gpu_memory, gpus=args.gpus, nodes=args.nodes)
    print(json.dumps(result.to_dict(), indent=2) if args.json else render(result))
    return 0


def _add_plan(sub: Any) -> None:
    """``dpokit plan``."""
    plan = sub.add_parser("plan", help="per-GPU memory by part, host RAM, FLOPs per step, fits or not, and the "
                                       "smallest change that fits (reads only the model's config.json)")
    plan.add_argument("config", help="YAML config file")
    plan.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.pass_tokens=4096")
    plan.add_argument("--gpu-memory", default="80GB", help="memory of one GPU, e.g. 24GB, 80GB (GB as on the "
                                                           "card's label: 80GB = 80 GiB)")
    plan.add_argument("--gpus", type=int, default=1, help="GPUs per node")
    plan.add_argument("--nodes", type=int, default=1)
    plan.add_argument("--json", action="store_true", help="print JSON instead of text")
    plan.set_defaults(func=cmd_plan)


def _add_recipe(sub: Any) -> None:
    """``dpokit recipe``."""
    from dpokit.recipes import RECIPES
    recipe = sub.add_parser("recipe", help="an experiment end to end, e.g. the paper's controlled sentiment")
    recipe.add_argument("name", choices=sorted(RECIPES), help="; ".join(f"{r.name}: {r.summary}"
                                                                    for r in RECIPES.values()))
    recipe.add_argument("overrides", nargs="*", help="dotted overrides, e.g. dpo.betas=[0.1,1.0] train.lr=3e-5")
    recipe.add_argument("--preset", help="demo, paper (configs/recipes/NAME-PRESET.yaml) or a YAML file; "
                                         "default: the built-in settings, which are the demo's")
    recipe.set_defaults(func=cmd_recipe)


def build_parser() -> argparse.ArgumentParser:
    from dpokit.version import __version__

    parser = argparse.ArgumentParser(prog="dpokit", description="Direct Preference Optimization for causal LMs.")
    parser.add_argument("--version", action="version", version=f"dpokit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_data, _add_training, _add_score, _add_eval, _add_report, _add_serve, _add_env, _add_recipe,
                _add_export, _add_config, _add_plan):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress display is enough
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # key=value overrides may come after options (``recipe sentiment --preset demo train.lr=1e-5``), which
        # argparse leaves over once the positionals were taken; anything else is reported as argparse does.
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*(args.overrides or []), *extra]
        else:
            parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Preempted as exc:  # a checkpoint is saved: say where, and how to go on (rank 0 only)
        if is_main_process():
            resume = f"; resume with: {resume_command(args)}" if hasattr(args, "config") else ""
            print(f"dpokit: {exc}{resume}", file=sys.stderr)
        return exc.exit_code
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
