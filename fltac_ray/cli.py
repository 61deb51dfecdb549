"""`fltac-ray run | report | export | validate | params | tune | toy | tasks` — the command-line entry point."""

from __future__ import annotations

import argparse
import os
import sys

from fltac_ray.errors import FltacError

# Exit codes: 0 done; 1 an unexpected error (a Python traceback: please report it); 2 fltac-ray
# refused or stopped the run with a message (configuration, data, run folder, resources, engine);
# 3 the run finished but some rounds were rejected (nothing aggregated in them: see rounds.csv);
# 130 interrupted (completed rounds are kept).
EXIT_USAGE = 2
EXIT_REJECTED_ROUNDS = 3


def _rejected_rounds(result) -> int:
    """The exit code of a finished run or comparison: 3 when a round was rejected, with a line."""
    runs = getattr(result, "runs", None) or {"": result}
    rejected = {label: r.rounds.loc[r.rounds["status"] != "ok", "round"].tolist() for label, r in runs.items()}
    rejected = {label: rounds for label, rounds in rejected.items() if rounds}
    for label, rounds in rejected.items():
        where = f"{label}: " if label else ""
        print(f"fltac-ray: warning: {where}rounds {rounds} were rejected (nothing aggregated; see "
              "rounds.csv and the REJECTED lines)", file=sys.stderr)
    return EXIT_REJECTED_ROUNDS if rejected else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fltac-ray",
        description="Federated multi-task fine-tuning with low-rank adapters, simulated on Ray.",
    )
    from fltac_ray import __version__

    parser.add_argument("--version", action="version", version=f"fltac-ray {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def experiment_args(sub: argparse.ArgumentParser, optional: bool = False) -> None:
        sub.add_argument("experiment", nargs="?" if optional else None,
                         help="experiment YAML (see experiments/)")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config field, e.g. --set rounds=3 --set train.lr=1e-3")

    run = commands.add_parser("run", help="run a simulation")
    experiment_args(run, optional=True)
    run.add_argument("--out", help="run directory (new or empty); default: <output_dir>/<name>-<time>")
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue an interrupted run from its newest valid checkpoint")
    run.add_argument("--quiet", action="store_true", help="print nothing but errors")
    run.add_argument("--quick", action="store_true",
                     help="the quick profile: in process, the modality's tiny model, 4 clients, 2 rounds "
                          "(a check of the pipeline in seconds; --set still wins)")
    run.add_argument("--no-report", action="store_true",
                     help="skip the figures and report.html at the end (fltac-ray report draws them later)")
    run.add_argument("--projection", default="auto", choices=["auto", "umap", "pca"],
                     help="how the report projects adapters to 2-D (auto: UMAP when umap-learn is installed)")

    report = commands.add_parser(
        "report", help="draw a run's (or comparison's) figures as PNGs and one self-contained report.html")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run directory or a comparison folder")
    report.add_argument("--projection", default="auto", choices=["auto", "umap", "pca"],
                        help="adapter projection (auto: UMAP when umap-learn is installed, else PCA)")

    export = commands.add_parser(
        "export", help="copy a run's exported peft adapters to a folder, or push them to the Hugging Face Hub")
    export.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (its adapters/ folder)")
    export.add_argument("--cluster", type=int, help="only this cluster's adapter, at the top of the "
                        "destination (default: every cluster, each in cluster_<k>/)")
    where = export.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", metavar="DIR", help="a new or empty folder to copy the adapters to")
    where.add_argument("--push-to-hub", metavar="REPO", help="Hub model repository (user/name), created if missing")
    where.add_argument("--bank", metavar="DIR", help="a new or empty folder for a serving bank: every cluster "
                       "adapter, with bank.json mapping the run's clients and tasks to adapters "
                       "(fltac_ray.runs.bank.AdapterBank loads it on one base)")
    export.add_argument("--private", action="store_true", help="create the Hub repository private")

    validate = commands.add_parser("validate", help="check an experiment file and print the resolved config")
    experiment_args(validate)

    tune = commands.add_parser("tune", help="run a Ray Tune sweep (see experiments/sweep_*.yaml)")
    tune.add_argument("sweep", nargs="?", help="sweep YAML")
    tune.add_argument("--out", help="sweep folder (new or empty); default: <output_dir>/<name>-<time>")
    tune.add_argument("--resume", metavar="SWEEP_DIR", help="continue an interrupted sweep")
    tune.add_argument("--storage", metavar="PATH_OR_URI",
                      help="where Ray Tune persists the trials: a folder every node shares, or "
                      "s3://... / gs://...; required on a cluster of several nodes")
    tune.add_argument("--quiet", action="store_true", help="print nothing but errors")
    tune.add_argument("--no-report", action="store_true", help="skip the sweep's figures and report.html")
    tune.add_argument("--projection", default="auto", choices=["auto", "umap", "pca"],
                      help="adapter projection of the report (auto: UMAP when umap-learn is installed)")

    params = commands.add_parser(
        "params", help="trainable and per-round communicated parameters of a client holding every "
        "task (meta-device model: no weights are read)")
    experiment_args(params)

    toy = commands.add_parser("toy", help="FL-TAC's sinusoid study (paper Fig. 3): per-task vs "
                              "shared networks over hidden widths")
    toy.add_argument("--out", default="runs/toy_sinusoid", help="folder for toy_sinusoid.csv/.png")
    toy.add_argument("--widths", default="1,2,4,8,16,32,64", help="comma-separated hidden widths")
    toy.add_argument("--seeds", type=int, default=3, help="repetitions averaged per width")
    toy.add_argument("--epochs", type=int, default=1000, help="full-batch training epochs")

    commands.add_parser("tasks", help="list the registered tasks, models and algorithms")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # `algorithm: my_methods:MyClass` and `plugins: [my_tasks]` find the user's own files in the
    # current folder, as `python -m` would (a console script's sys.path lacks it)
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        if args.command == "tasks":
            return _list_registries()
        if args.command == "toy":
            from fltac_ray.toy import run_toy_study

            widths = [int(w) for w in args.widths.split(",") if w.strip()]
            run_toy_study(args.out, widths, args.seeds, args.epochs)
            return 0
        if args.command == "report":
            from fltac_ray.reporting.render import render_report

            drawn = render_report(args.run_dir, args.projection)
            for name, path in drawn.figures.items():
                print(f"  {name:<20} {path}")
            for name, why in drawn.skipped.items():
                print(f"  {name:<20} not drawn: {why}")
            print(f"report: {drawn.html}")
            return 0
        if args.command == "export":
            return _export(args)
        if args.command == "tune":
            from fltac_ray.errors import ConfigError, ConfigIssue
            from fltac_ray.progress import Progress
            from fltac_ray.tune import run_sweep

            if (args.sweep is None) == (args.resume is None):
                raise ConfigError([ConfigIssue("tune", args.sweep or args.resume,
                                               "give either SWEEP.yaml or --resume SWEEP_DIR")])
            progress = Progress(quiet=args.quiet)
            sweep_dir, _, _ = run_sweep(args.sweep, args.out, progress, resume=args.resume, storage=args.storage)
            if not args.no_report:
                from fltac_ray.api import finish_with_report

                finish_with_report(sweep_dir, args.projection, progress)
            return 0
        import yaml

        from fltac_ray.compare import load_variants
        from fltac_ray.config import load_config
        from fltac_ray.errors import ConfigError, ConfigIssue

        if args.command == "run" and (args.resume is not None) == (args.experiment is not None):
            raise ConfigError([ConfigIssue("run", args.experiment or args.resume,
                                           "give either EXPERIMENT.yaml or --resume RUN_DIR")])
        if args.command == "run" and args.resume is not None:
            if args.overrides or args.out or args.quick:
                raise ConfigError([ConfigIssue("--resume", args.resume,
                                               "continues the run's saved config: no --set, --out or --quick")])
            from fltac_ray.api import resume

            result = resume(args.resume, quiet=args.quiet, report=not args.no_report, projection=args.projection)
            return _rejected_rounds(result)
        if args.command == "run":  # a run or a comparison, as fltac_ray.run does it
            from fltac_ray.api import run

            result = run(args.experiment, args.overrides, out=args.out, quiet=args.quiet,
                         report=not args.no_report, projection=args.projection, quick=args.quick)
            return _rejected_rounds(result)
        variants = load_variants(args.experiment, args.overrides)
        if variants is not None:  # a comparison file (`compare:` list)
            if args.command == "validate":
                print(yaml.safe_dump({v.label: v.config.resolved() for v in variants}, sort_keys=False), end="")
                return 0
            return _print_params([v.config for v in variants])
        config = load_config(args.experiment, args.overrides)
        if args.command == "validate":
            print(yaml.safe_dump(config.resolved(), sort_keys=False), end="")
            return 0
        return _print_params([config])
    except FltacError as exc:
        kind = f"{exc.heading}: " if exc.heading else ""
        print(f"fltac-ray: error: {kind}{exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fltac-ray: interrupted; completed rounds are in the run directory", file=sys.stderr)
        return 130


def _export(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    from fltac_ray.errors import RunFolderError
    from fltac_ray.runs.export import push_to_hub, read_info
    from fltac_ray.runs.files import holds_something, written_whole

    if args.bank:
        from fltac_ray.runs.bank import write_bank

        if args.cluster is not None:
            from fltac_ray.errors import ConfigError, ConfigIssue

            raise ConfigError([ConfigIssue("--cluster", args.cluster, "a bank holds every cluster; drop --cluster")])
        manifest = write_bank(args.run_dir, args.bank)
        print(f"wrote a bank of {len(manifest['adapters'])} adapters for {len(manifest['clients'])} clients to "
              f"{args.bank} (bank.json)")
        return 0
    adapters = Path(args.run_dir) / "adapters"
    if not (adapters / "index.json").is_file():
        raise RunFolderError(args.run_dir, "has no adapters/index.json; give a finished run's directory "
                             "(fltac-ray run exports its adapters at the end)")
    source = adapters
    if args.cluster is not None:
        source = adapters / f"cluster_{args.cluster}"
        if not source.is_dir():
            have = sorted(p.name for p in adapters.glob("cluster_*"))
            raise RunFolderError(args.run_dir, f"--cluster {args.cluster}: no adapters/{source.name}; it has {have}")
        read_info(source)  # peft adapters only (FLoRAL's mixtures are not)
    if args.push_to_hub:
        url = push_to_hub(source, args.push_to_hub, private=args.private)
        print(f"pushed {source} to {args.push_to_hub}: {url}")
        return 0
    out = Path(args.out)
    if holds_something(out):
        raise RunFolderError(out, "--out is not empty; give a new or empty folder")
    # copied beside --out and renamed into place: an export killed midway leaves no --out that
    # looks complete (a hidden .NAME.partial, removed by the next export)
    with written_whole(out) as partial:
        shutil.copytree(source, partial, dirs_exist_ok=True)
    print(f"copied {source} to {out}")
    return 0


def _print_params(configs: list) -> int:
    from fltac_ray.models.counting import count_parameters, format_count

    print("\n\n".join(format_count(count_parameters(config)) for config in configs))
    return 0


def _list_registries() -> int:
    from fltac_ray.algorithms import algorithm_summaries, resolve_algorithm
    from fltac_ray.algorithms.options import describe_options
    from fltac_ray.data.registry import TASKS
    from fltac_ray.models.registry import MODELS

    print("tasks:")
    for spec in TASKS.values():
        classes = f"{spec.num_classes:>3} classes" if spec.num_classes else "generation "
        print(f"  {spec.name:<30} {spec.kind:<11} {classes}  {spec.description}")
    print("models:")
    for name, spec in MODELS.items():
        print(f"  {name:<30} {spec.modality:<11} {spec.description}")
    print("algorithms (options: algorithm: {name: <name>, <option>: <value>}):")
    for name, text in algorithm_summaries().items():
        print(f"  {name:<26} {text}")
        for line in describe_options(resolve_algorithm(name).Options):
            print(f"  {'':<28}{line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
