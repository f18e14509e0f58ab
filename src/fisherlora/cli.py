"""The ``fisherlora`` command line: ``fisherlora train ...`` and ``fisherlora compare ...``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import warnings
from collections.abc import Sequence

from fisherlora.errors import ConfigError, FisherLoraError
from fisherlora.experiments.compare import ALL_METHODS, QUICK, CompareConfig, compare, parse_ints
from fisherlora.experiments.distributed import is_main_process, shutdown
from fisherlora.experiments.report import write_report
from fisherlora.experiments.train import TrainConfig, train
from fisherlora.methods import method_names

DEFAULTS = TrainConfig()


def _add_train_arguments(parser: argparse.ArgumentParser, single_run: bool = True) -> None:
    """The settings of a run. ``single_run=False`` (compare) leaves out what a comparison varies
    (method, seed, rank, out) and lets ``--steps`` / ``--eval-every`` default to the preset."""
    data = parser.add_argument_group("data")
    data.add_argument(
        "--task",
        default=DEFAULTS.task,
        help="built-in task (rotten-tomatoes, imdb) or a Hugging Face data set name; add -gen "
        "(classification by generation) or -lm (language modelling) for a causal LM such as "
        "--model smollm2-135m",
    )
    data.add_argument("--data", help="your own training data: a .csv, .tsv, .jsonl or .json file")
    data.add_argument(
        "--test-data", help="a separate test file for --data (default: split by text hash)"
    )
    data.add_argument("--text-column", default=DEFAULTS.text_column)
    data.add_argument("--label-column", default=DEFAULTS.label_column)
    data.add_argument("--max-length", type=int, default=DEFAULTS.max_length, help="tokens per text")
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
        default=DEFAULTS.model,
        help="registry name (minilm, tiny-bert, tiny-llama), local folder or hub name",
    )
    if single_run:
        model.add_argument(
            "--method",
            default=DEFAULTS.method,
            help="lora, fim-lora, random-rank, filet, fw-lora, a '+' combination of ours "
            "(fim-lora+filet+fw-lora), or a peer: dora, pissa, eva, lora-ga, corda, adalora",
        )
        model.add_argument("--rank", type=int, default=DEFAULTS.rank)
        model.add_argument("--alpha", type=float, default=DEFAULTS.alpha)
    else:
        model.add_argument(
            "--alpha", type=float, help="LoRA alpha at every rank (default: 2 x rank)"
        )
    model.add_argument("--dropout", type=float, default=DEFAULTS.dropout, help="LoRA dropout")
    model.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(rank)")
    model.add_argument(
        "--targets", help="comma-separated module name suffixes (default: per architecture)"
    )

    calib = parser.add_argument_group("calibration and rank allocation (fim-lora, random-rank)")
    calib.add_argument(
        "--calib-batches",
        type=int,
        default=DEFAULTS.calib_batches,
        help="forward/backward passes on training data before training",
    )
    calib.add_argument(
        "--layers-per-pass",
        type=int,
        help="memory-bounded calibration: process the target layers in groups of this many "
        "(fim-lora, filet; same result, more passes)",
    )
    calib.add_argument(
        "--r-min", type=int, help="smallest rank a module may get (default: rank // 2)"
    )
    calib.add_argument(
        "--r-max", type=int, help="largest rank a module may get (default: 2 x rank)"
    )
    calib.add_argument(
        "--budget",
        default=DEFAULTS.budget,
        choices=["ranks", "params"],
        help="what fim-lora / random-rank keep of LoRA at rank r: the total adapter parameters "
        "(params, the default: never above, within one module's rank cost) or the total rank "
        "(ranks)",
    )
    calib.add_argument(
        "--score",
        default=DEFAULTS.score,
        choices=["mean", "max", "l2"],
        help="reduction of a module's Fisher diagonal to its score",
    )
    calib.add_argument(
        "--estimator",
        default=DEFAULTS.estimator,
        choices=["per_example", "batch"],
        help="FIM-LoRA's Fisher: per-example squared gradients (the paper's Eq. 1, default) or "
        "squared mini-batch gradients (the variant fim-lora-batch)",
    )

    filet = parser.add_argument_group("FILet initialisation (filet)")
    filet.add_argument(
        "--basis",
        default=DEFAULTS.basis,
        choices=["gram", "svd"],
        help="candidate directions: the paper's gram basis (default) or orthonormal singular "
        "vectors (the filet-svd variant)",
    )
    filet.add_argument(
        "--select",
        default=DEFAULTS.select,
        choices=["min", "max", "random"],
        help="which Fisher energies to initialise in (min: the paper)",
    )
    filet.add_argument(
        "--scale",
        default=DEFAULTS.scale,
        choices=["fisher-norm", "fisher", "singular"],
        help="adapter magnitudes: the energies times one scale per layer so that ‖sBA‖₂ is the "
        "largest selected ‖W v̂‖ (default), the raw energies, or singular values (--basis svd)",
    )

    fw = parser.add_argument_group("Fisher-weighted penalty (fw-lora)")
    fw.add_argument(
        "--fw-warmup-steps", type=int, help="warm-up K (default: 500, or steps // 5 when shorter)"
    )
    fw.add_argument("--fw-lambda", type=float, default=DEFAULTS.fw_lambda, help="penalty weight λ")
    fw.add_argument(
        "--fw-estimator",
        default=DEFAULTS.fw_estimator,
        choices=["sketch", "exact"],
        help="frozen-weight gradient norm: Gaussian sketch or exact",
    )
    fw.add_argument("--fw-probes", type=int, default=DEFAULTS.fw_probes, help="sketch probes k")
    fw.add_argument("--fw-normalize", default=DEFAULTS.fw_normalize, choices=["sum", "max"])
    fw.add_argument(
        "--fw-mode",
        default=DEFAULTS.fw_mode,
        choices=["loss", "decay"],
        help="penalty in the loss (exact) or per-module AdamW weight decay",
    )

    loop = parser.add_argument_group("training")
    loop.add_argument(
        "--steps",
        type=int,
        default=DEFAULTS.steps if single_run else None,
        help="optimizer steps" + ("" if single_run else " (default 300; 150 with --quick)"),
    )
    loop.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    loop.add_argument(
        "--grad-accum",
        type=int,
        default=DEFAULTS.grad_accum,
        help="micro-batches per optimizer step",
    )
    loop.add_argument("--lr", type=float, default=DEFAULTS.lr)
    loop.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay)
    loop.add_argument("--warmup-ratio", type=float, default=DEFAULTS.warmup_ratio)
    loop.add_argument("--max-grad-norm", type=float, default=DEFAULTS.max_grad_norm)
    loop.add_argument(
        "--eval-every",
        type=int,
        default=DEFAULTS.eval_every if single_run else None,
        help="steps between evaluations (0: only at the end"
        + (")" if single_run else "; default 100, 75 with --quick)"),
    )
    loop.add_argument("--eval-batch-size", type=int, default=DEFAULTS.eval_batch_size)
    if single_run:
        loop.add_argument("--seed", type=int, default=DEFAULTS.seed)
    loop.add_argument("--device", default=DEFAULTS.device, help="auto, cpu, cuda or cuda:N")
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
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Every ``TrainConfig`` field from the flag of the same name (``--r-min`` → ``r_min``)."""
    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
    if args.targets is not None and not targets:
        raise ConfigError(f"--targets {args.targets!r} names no module")
    settings = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if hasattr(args, f.name)
    }
    settings |= {"targets": targets, "group_by_length": not args.no_group_by_length}
    return TrainConfig(**{k: v for k, v in settings.items() if v is not None or k in NULLABLE})


# Settings whose None means something (the default of the method or the architecture).
NULLABLE = {f.name for f in dataclasses.fields(TrainConfig) if f.default is None}


def compare_config_from_args(args: argparse.Namespace) -> CompareConfig:
    """The comparison from the flags; ``--quick`` fills in what the user did not set."""
    preset = QUICK if args.quick else {}
    args.steps = args.steps if args.steps is not None else preset.get("steps", DEFAULTS.steps)
    if args.eval_every is None:
        args.eval_every = preset.get("eval_every", DEFAULTS.eval_every)
    methods = method_names(args.methods or preset.get("methods", ALL_METHODS))
    seeds = parse_ints(args.seeds or preset.get("seeds", "0,1,2"), "--seeds", minimum=0)
    ranks = parse_ints(args.ranks or args.rank or str(DEFAULTS.rank), "--ranks", minimum=1)
    args.rank = ranks[0]  # the base run's rank (each run sets its own); --rank arrives as text
    return CompareConfig(
        methods=methods,
        seeds=seeds,
        ranks=ranks,
        out=args.out,
        base=config_from_args(args),
        alpha=args.alpha,
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
            result = train(config_from_args(args), progress=not args.no_progress)
            keys = ("method", "accuracy", "macro_f1", "mcc", "nll", "perplexity")
            summary = {k: result.metrics[k] for k in keys if k in result.metrics}
            summary["total_s"] = round(result.metrics["timings"]["total_s"], 1)
            if is_main_process():
                print(json.dumps(summary))
        elif args.command == "compare":
            config = compare_config_from_args(args)
            # the command that runs the comparison (a --report-only rewrite names the same one)
            given = [a for a in (argv or sys.argv[1:]) if a != "--report-only"]
            command = "fisherlora " + " ".join(shlex.quote(a) for a in given)
            if args.report_only:
                report = write_report(config, command=command)
            else:
                report = compare(config, progress=not args.no_progress, command=command)
            if is_main_process():
                print(f"report: {report} and {report.with_suffix('.html')}")
    except (FisherLoraError, FloatingPointError) as err:
        print(f"fisherlora: error: {err}", file=sys.stderr)
        return 2
    finally:
        shutdown()  # leave the torchrun / accelerate process group, if one was joined
    return 0


if __name__ == "__main__":
    sys.exit(main())
