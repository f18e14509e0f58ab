"""The ``fisherlora`` command line: ``fisherlora train ...`` and ``fisherlora compare ...``.

Loading torch, transformers and peft takes several seconds, so this module imports them (through
``fisherlora.experiments``) only inside the functions that run a command: ``--help`` and argument
errors answer at once. For the same reason a flag that is left out is ``None`` here and the
``TrainConfig`` default applies (``config_from_args``); the parser never reads ``TrainConfig``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fisherlora.allocate import ROUNDINGS
from fisherlora.errors import ConfigError, FisherLoraError
from fisherlora.experiments.presets import ALL_METHODS, QUICK

# The validation share of a comparison unless --val-fraction says otherwise (0 turns it off).
COMPARE_VAL_FRACTION = 0.1

if TYPE_CHECKING:
    from fisherlora.experiments.compare import CompareConfig
    from fisherlora.experiments.train import TrainConfig


def _add_train_arguments(parser: argparse.ArgumentParser, single_run: bool = True) -> None:
    """The settings of a run. ``single_run=False`` (compare) leaves out what a comparison varies
    (method, seed, rank, out) and lets ``--steps`` / ``--eval-every`` default to the preset."""
    data = parser.add_argument_group("data")
    data.add_argument(
        "--task",
        help="built-in task (rotten-tomatoes, imdb; images: digits) or a Hugging Face data set "
        "name; add -gen (classification by generation) or -lm (language modelling) for a causal "
        "LM such as --model smollm2-135m",
    )
    data.add_argument(
        "--data",
        help="your own training data: a .csv, .tsv, .jsonl or .json file of texts; images: a "
        "folder with one sub-folder per class, or a .csv with an 'image' column of paths",
    )
    data.add_argument(
        "--test-data",
        help="a separate test file (or image folder) for --data (default: split by a stable hash)",
    )
    data.add_argument("--text-column")
    data.add_argument("--label-column")
    data.add_argument(
        "--max-dropped-fraction",
        type=float,
        help="refuse a data file that loses more than this share of its rows to empty texts, "
        "missing labels or repeated texts (default 0.2; the counts are printed either way)",
    )
    data.add_argument("--max-length", type=int, help="tokens per text")
    data.add_argument(
        "--val-fraction",
        type=float,
        help="share of the training split held out as validation, in (0, 0.5]: the evaluations "
        "during training read it and the test split is read once at the end (default "
        + ("0: evaluations read test)" if single_run else "0.1)"),
    )
    data.add_argument(
        "--train-size",
        type=int,
        help="train on a fixed subset of N training examples (at least one batch)",
    )
    data.add_argument(
        "--max-test",
        type=int,
        help="evaluate on N test examples, a fixed random subset (default: all)",
    )
    data.add_argument(
        "--no-group-by-length",
        action="store_true",
        help="plain shuffled batches instead of batches of similar length",
    )

    model = parser.add_argument_group("model and adapter")
    model.add_argument(
        "--model",
        help="registry name (minilm, tiny-bert, tiny-llama; images: tiny-vit), local folder or "
        "hub name",
    )
    if single_run:
        model.add_argument(
            "--method",
            help="lora, fim-lora, random-rank, filet, fw-lora, a '+' combination of ours "
            "(fim-lora+filet+fw-lora), a peer: dora, pissa, eva, lora-ga, corda, adalora, or a "
            "named variant (fim-lora-batch, filet-svd, ...: docs/methods.md)",
        )
        model.add_argument("--rank", type=int)
        model.add_argument("--alpha", type=float)
    else:
        model.add_argument(
            "--alpha", type=float, help="LoRA alpha at every rank (default: 2 x rank)"
        )
    model.add_argument("--dropout", type=float, help="LoRA dropout")
    model.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(rank)")
    model.add_argument(
        "--targets", help="comma-separated module name suffixes (default: per architecture)"
    )

    calib = parser.add_argument_group("calibration and rank allocation (fim-lora, random-rank)")
    calib.add_argument(
        "--calib-batches",
        type=int,
        help="forward/backward passes on training data before training",
    )
    calib.add_argument(
        "--layers-per-pass",
        type=int,
        help="memory-bounded calibration: process the target layers in groups of this many "
        "(fim-lora, filet; same result, more passes)",
    )
    calib.add_argument(
        "--r-min", type=int, help="smallest rank a module may get (default: max(1, rank // 2))"
    )
    calib.add_argument(
        "--r-max",
        type=int,
        help=(
            "largest rank a module may get (default: 2 x rank, capped at the narrowest target's "
            "min(in, out) but never below rank)"
        ),
    )
    calib.add_argument(
        "--budget",
        choices=["ranks", "params"],
        help="what fim-lora / random-rank keep of LoRA at rank r: the total adapter parameters "
        "(params, the default: never above, within one module's rank cost) or the total rank "
        "(ranks)",
    )
    calib.add_argument(
        "--rounding",
        choices=list(ROUNDINGS),
        help="how fim-lora / random-rank hand out the ranks left after flooring their targets "
        "under a parameter budget: so as to spend the most of the budget any such rounding can "
        "(largest, the default) or each to the next module that fits (maximal)",
    )
    calib.add_argument(
        "--score",
        choices=["mean", "max", "l2"],
        help="reduction of a module's Fisher diagonal to its score",
    )
    calib.add_argument(
        "--estimator",
        choices=["per_example", "batch"],
        help="FIM-LoRA's Fisher: per-example squared gradients (the paper's Eq. 1, default) or "
        "squared mini-batch gradients (the variant fim-lora-batch)",
    )

    filet = parser.add_argument_group("FILet initialisation (filet)")
    filet.add_argument(
        "--basis",
        choices=["gram", "svd"],
        help="candidate directions: the paper's gram basis (default) or orthonormal singular "
        "vectors (the filet-svd variant)",
    )
    filet.add_argument(
        "--select",
        choices=["min", "max", "random"],
        help="which Fisher energies to initialise in (min: the paper)",
    )
    filet.add_argument(
        "--scale",
        choices=["fisher-norm", "fisher", "singular"],
        help="adapter magnitudes: the energies times one scale per layer so that ‖sBA‖₂ is the "
        "largest selected ‖W v̂‖ (default), the raw energies, or singular values (--basis svd)",
    )

    fw = parser.add_argument_group("Fisher-weighted penalty (fw-lora)")
    fw.add_argument(
        "--fw-warmup-steps", type=int, help="warm-up K (default: 500, or steps // 5 when shorter)"
    )
    fw.add_argument("--fw-lambda", type=float, help="penalty weight λ")
    fw.add_argument(
        "--fw-estimator",
        choices=["sketch", "exact"],
        help="frozen-weight gradient norm: Gaussian sketch or exact",
    )
    fw.add_argument("--fw-probes", type=int, help="sketch probes k")
    fw.add_argument("--fw-normalize", choices=["sum", "max"])
    fw.add_argument(
        "--fw-mode",
        choices=["loss", "decay"],
        help="penalty in the loss (exact) or per-module AdamW weight decay",
    )

    loop = parser.add_argument_group("training")
    loop.add_argument(
        "--steps",
        type=int,
        help="optimizer steps" + ("" if single_run else " (default 300; 150 with --quick)"),
    )
    loop.add_argument("--batch-size", type=int)
    loop.add_argument(
        "--grad-accum",
        type=int,
        help="micro-batches per optimizer step",
    )
    loop.add_argument("--lr", type=float)
    loop.add_argument("--weight-decay", type=float)
    loop.add_argument("--warmup-ratio", type=float)
    loop.add_argument("--max-grad-norm", type=float)
    loop.add_argument(
        "--eval-every",
        type=int,
        help="steps between evaluations (0: only at the end"
        + (")" if single_run else "; default 100, 75 with --quick)"),
    )
    loop.add_argument("--eval-batch-size", type=int)
    if single_run:
        loop.add_argument("--seed", type=int)
    loop.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    loop.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        help="fp32 (default), or forward passes and losses under bf16 / fp16 autocast with "
        "float32 master weights (fp16 with loss scaling); the weights load in float32 "
        "whatever dtype the checkpoint was saved in",
    )
    if single_run:
        loop.add_argument(
            "--out", help="run directory (config.json, curve.csv, metrics.json, adapter/)"
        )
    loop.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    grid = parser.add_argument_group("comparison")
    grid.add_argument(
        "--methods",
        help=f"comma-separated methods (default: all, {ALL_METHODS}; with --quick: "
        f"{QUICK['methods']})",
    )
    grid.add_argument("--seeds", help="comma-separated seeds (default 0,1,2; with --quick: 0)")
    grid.add_argument("--rank", help="the LoRA rank r, i.e. the budget of r per module (default 8)")
    grid.add_argument("--ranks", help="sweep several budgets, e.g. 1,2,4,8 (overrides --rank)")
    grid.add_argument(
        "--lr-grid",
        help="pick each method's learning rate per rank from these rates on the validation "
        "split (tuning runs), e.g. 1e-4,3e-4,1e-3,3e-3; the final seeds run at the pick",
    )
    grid.add_argument(
        "--tune-seeds", help="seeds of the --lr-grid tuning runs (default 100, not a final seed)"
    )
    grid.add_argument(
        "--select-by",
        choices=["accuracy", "nll"],
        help="the validation score --lr-grid picks by: accuracy (ties: NLL) or nll (default: "
        "nll for a language-modelling task, -lm, which has no accuracy; accuracy otherwise)",
    )
    grid.add_argument(
        "--quick",
        action="store_true",
        help="the README preset: LoRA and our methods, one seed, 150 steps (<= 10 min, 2 CPUs)",
    )
    grid.add_argument(
        "--report-only",
        action="store_true",
        help="write the report from finished runs; train nothing",
    )
    grid.add_argument("--out", required=True, help="comparison directory (resumable)")
    _add_train_arguments(parser, single_run=False)


def _add_suite_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "suite", help="a built-in suite (cpu, gpu) or a TOML file of [[cell]] entries"
    )
    parser.add_argument(
        "--out", help="suite directory, one comparison per cell in OUT/<cell>/ (resumable)"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the cells, their runs and an estimate of the hours; train nothing",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the cells' reports and the suite report from finished runs; train nothing",
    )
    parser.add_argument(
        "--cells",
        metavar="NAME[,NAME]",
        help="run (or dry-run, or report) only these cells, e.g. to share a suite out over "
        "processes, each with its own cells and one --out; the suite report covers every cell",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fisherlora", description="Data-aware LoRA fine-tuning with Fisher information."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser(
        "train", help="fine-tune one model with one method and evaluate it"
    )
    _add_train_arguments(train_parser)
    compare_parser = commands.add_parser(
        "compare",
        help="run several methods over seeds and ranks on one task and write a report",
    )
    _add_compare_arguments(compare_parser)
    suite_parser = commands.add_parser(
        "suite",
        help="run one comparison per cell of a suite (built-in: cpu, gpu; or a TOML file) and "
        "pool them in one report",
    )
    _add_suite_arguments(suite_parser)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Every ``TrainConfig`` field from the flag of the same name (``--r-min`` → ``r_min``); a
    flag left out (``None``) keeps the field's default."""
    from fisherlora.experiments.train import TrainConfig

    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
    if args.targets is not None and not targets:
        raise ConfigError(f"--targets {args.targets!r} names no module")
    settings = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if hasattr(args, f.name)
    }
    settings |= {"targets": targets, "group_by_length": not args.no_group_by_length}
    return TrainConfig(**{k: v for k, v in settings.items() if v is not None})


def given_or(value: str | None, default: str) -> str:
    """A flag's text where it was given (also when given empty), else the default."""
    return default if value is None else value


def compare_config_from_args(args: argparse.Namespace) -> CompareConfig:
    """The comparison from the flags; ``--quick`` fills in what the user did not set."""
    from fisherlora.experiments.compare import TUNE_SEED, CompareConfig, parse_floats, parse_ints
    from fisherlora.experiments.train import TrainConfig
    from fisherlora.methods import method_names

    defaults = TrainConfig()
    preset = QUICK if args.quick else {}
    args.steps = args.steps if args.steps is not None else preset.get("steps", defaults.steps)
    if args.eval_every is None:
        args.eval_every = preset.get("eval_every", defaults.eval_every)
    # a flag given empty (--seeds "") names nothing: refused by the parsers, not the default
    methods = method_names(given_or(args.methods, preset.get("methods", ALL_METHODS)))
    seeds = parse_ints(given_or(args.seeds, preset.get("seeds", "0,1,2")), "--seeds", minimum=0)
    given = "--ranks" if args.ranks is not None else "--rank"  # the flag the value came from
    ranks = parse_ints(
        given_or(args.ranks, given_or(args.rank, str(defaults.rank))), given, minimum=1
    )
    args.rank = ranks[0]  # the base run's rank (each run sets its own); --rank arrives as text
    if args.val_fraction is None:  # comparisons select on validation, never on test
        args.val_fraction = COMPARE_VAL_FRACTION
    if args.quick and args.lr_grid:
        raise ConfigError("--quick runs at one learning rate; leave out --lr-grid (or --quick)")
    lr_grid = parse_floats(args.lr_grid, "--lr-grid") if args.lr_grid is not None else None
    tuning_only = [
        f
        for f, v in (("--select-by", args.select_by), ("--tune-seeds", args.tune_seeds))
        if v is not None
    ]
    if tuning_only and lr_grid is None:  # they would be ignored without a word
        raise ConfigError(
            f"{' and '.join(tuning_only)} apply to the --lr-grid tuning; give --lr-grid or leave them out"
        )
    tune_seeds = parse_ints(given_or(args.tune_seeds, str(TUNE_SEED)), "--tune-seeds", minimum=0)
    return CompareConfig(
        methods=methods,
        seeds=seeds,
        ranks=ranks,
        out=args.out,
        base=config_from_args(args),
        alpha=args.alpha,
        lr_grid=lr_grid,
        tune_seeds=tune_seeds,
        select_by=args.select_by,
    )


def check_out_dir(path: str, flag: str = "--out") -> None:
    """Refuse an output directory that cannot be made or written, before any work is done (a
    run would otherwise load the model and data, and then fail with an OS traceback).

    ``path`` may exist (a directory we can write to) or not (then its nearest existing parent
    must be a directory we can write to, since the run creates the missing levels)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {path!r} is an existing file, not a directory; choose another")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"{flag} {path!r} cannot be made: {str(existing)!r} is a file, not a directory"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{flag} {path!r} cannot be written: permission denied on {str(existing)!r}; "
            "choose a directory you can write to"
        )


def _interrupted(args: argparse.Namespace) -> str:
    """The one line printed on Ctrl-C: what stopped and how to go on from there."""
    if args.command == "suite":
        return (
            f"fisherlora: interrupted: the suite in {args.out} stopped; its finished runs are "
            "kept and re-running the same command resumes it"
        )
    if args.command == "compare":
        return (
            f"fisherlora: interrupted: the comparison in {args.out} stopped; its finished runs "
            "are kept and re-running the same command resumes it"
        )
    # the folder is rewritten only once the method's calibration has passed: an earlier stop
    # leaves a finished run there as it was
    finished = args.out and (Path(args.out) / "metrics.json").exists()
    kept = f" ({args.out} holds no finished run)" if args.out and not finished else ""
    return (
        f"fisherlora: interrupted: the train run stopped before it finished{kept}; re-running "
        "the same command restarts it from the beginning"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # PEFT calls a transformers API that warns about its own deprecation on every model.
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
    )
    try:
        if args.command == "train":
            if args.out is not None:
                check_out_dir(args.out)  # first: it needs no torch, so it answers at once
            from fisherlora.experiments.distributed import is_main_process
            from fisherlora.experiments.train import train

            result = train(config_from_args(args), progress=not args.no_progress)
            keys = ("method", "accuracy", "macro_f1", "mcc", "nll", "perplexity")
            summary = {k: result.metrics[k] for k in keys if k in result.metrics}
            summary["total_s"] = round(result.metrics["timings"]["total_s"], 1)
            if is_main_process():
                print(json.dumps(summary))
        elif args.command == "compare":
            check_out_dir(args.out)  # first: it needs no torch, so it answers at once
            from fisherlora.experiments.compare import compare
            from fisherlora.experiments.distributed import is_main_process
            from fisherlora.experiments.report import write_report

            config = compare_config_from_args(args)
            # the command that runs the comparison (a --report-only rewrite names the same one)
            given = [a for a in (argv or sys.argv[1:]) if a != "--report-only"]
            command = "fisherlora " + " ".join(shlex.quote(a) for a in given)
            if args.report_only:
                if not (Path(config.out) / "compare.json").exists():
                    raise ConfigError(f"--report-only: no comparison in {config.out} to report on")
                report = write_report(config, command=command)
            else:
                report = compare(config, progress=not args.no_progress, command=command)
            if is_main_process():
                print(f"report: {report} and {report.with_suffix('.html')}")
        elif args.command == "suite":
            from fisherlora.experiments.distributed import is_main_process
            from fisherlora.experiments.suite import suite_command

            if args.out and not args.dry_run:
                check_out_dir(args.out)
            text = suite_command(args, argv)
            if is_main_process():
                print(text)
    except (FisherLoraError, FloatingPointError) as err:
        print(f"fisherlora: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C is the user's choice, not a failure to report: one line instead of the stack of
        # whatever was running, and 130 (128 + SIGINT), the exit status shells give it.
        print(_interrupted(args), file=sys.stderr)
        return 130
    finally:
        # leave the torchrun / accelerate process group, if one was joined (only possible once
        # the module was loaded: an argument error must not pay for importing torch here)
        distributed = sys.modules.get("fisherlora.experiments.distributed")
        if distributed is not None:
            distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
