"""The ``densepure`` command line (typer). Every command has ``--help``.

    densepure certify [--config FILE|PRESET] [--out DIR|s3://b/p] [--ray-address ADDR] [--set k=v ...]
    densepure attack [--config FILE|PRESET] [--out DIR|s3://b/p] [--ray-address ADDR] [--set k=v ...]
    densepure train-addt [--config FILE|PRESET] [--out DIR|s3://b/p] [--ray-address ADDR] [--set k=v ...]
    densepure sql STORE_OR_OUT... "SELECT ..." [--alpha A] [--format table|csv|json]
    densepure compare A B [--format table|csv|json] [--report DIR]
    densepure report OUT_OR_STORE [--radii 0,0.5,1]
    densepure export-tsv OUT [--dest DIR]
    densepure repair OUT
    densepure train-toy [--out DIR] [--seed N] [--quick]
    densepure config show [--config FILE] [--set k=v ...]
    densepure convert-adm CHECKPOINT OUT_DIR [--preset ...]
    densepure models fetch PRESET [--cache DIR]
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

from flows.cli_models import register as _register_models  # (convert-adm, models fetch/list)


def _flags_show_no_type() -> None:
    """typer 0.29's rich help gives every flag a type column, ``<bool>``, as if it took a value
    (``--allow-partial true`` is refused: a flag takes none); its plain help leaves flags
    untyped. Show flags as flags: no type for an option that is a flag."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich
    if getattr(shown, "_densepure_flags", False):
        return

    def display_type_rich(self, ctx):
        return None if self.is_flag and self.metavar is None else shown(self, ctx)

    display_type_rich._densepure_flags = True
    TyperOption.display_type_rich = display_type_rich


_flags_show_no_type()

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Certified robustness of image classifiers with diffusion purification "
                       "(randomized smoothing, DDS, DensePure).")
config_app = typer.Typer(no_args_is_help=True, help="Inspect and validate configs.")
app.add_typer(config_app, name="config")
_register_models(app)

#: The config of `densepure certify` without --config: a preset shipped as package data
#: (densepure_core/config/presets/default.yaml, read with importlib.resources; config.packaged_config).
DEFAULT_CONFIG = "default"
#: The config of `densepure attack` without --config (densepure_core/config/presets/attack_default.yaml).
DEFAULT_ATTACK_CONFIG = "attack_default"
#: The config of `densepure train-addt` without --config (densepure_core/config/presets/addt_default.yaml).
DEFAULT_ADDT_CONFIG = "addt_default"


@app.callback()
def _entry() -> None:
    """The entry point of every command, run before it (and before it imports torch or Prefect,
    which read these settings at import): environment defaults (flows/environment.py) and the
    fault-injection driver record (tasks/common/faults.py, tests only). Importing this module sets
    nothing."""
    from flows.environment import apply_environment_defaults
    from tasks.common.faults import record_driver_process_group

    apply_environment_defaults()
    record_driver_process_group()


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _write_details(out: str, exc: BaseException) -> str | None:
    """Write ``exc``'s whole traceback chain (Ray's remote traceback included) to
    ``OUT/logs/error-<UTC time>.log``; its URI, or None when OUT holds no run (nothing is created
    there) or the write fails (the error line must still come)."""
    import traceback
    from datetime import datetime, timezone

    from tasks.common import storage
    from tasks.common.run_dir import RunDir

    try:
        run = RunDir(out)
        if not run.exists(run.config_uri):
            return None
        uri = storage.join(run.logs_dir, f"error-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}.log")
        run.write_text(uri, "".join(traceback.format_exception(exc)))
        return uri
    except Exception:  # noqa: BLE001 - the details are a courtesy; the error line is what counts
        return None


def _fail_with_cause(exc: BaseException, out: str | None = None) -> None:
    """End a failed run with its user-facing cause as one ``error:`` line (exit code 1).

    A known error (a refusal naming the input and the fix) is the whole story. An unexpected one
    is shown as its type and message, and its traceback goes to a log file under ``out`` (when
    OUT holds a run), named in the line.
    """
    from tasks.common.planning import PlanError

    from tasks.common.workers import root_cause

    cause = root_cause(exc)
    if isinstance(cause, (PlanError, ValueError, OSError, FloatingPointError)):
        _fail(str(cause), 1)
    details = _write_details(out, exc) if out else None
    _fail(f"{type(cause).__name__}: {cause}" + (f" (details: {details})" if details else ""), 1)


def _interrupted(out: str) -> None:
    """End a run stopped by Ctrl-C (SIGINT): say that it resumes, exit 130 (the shell's code for it)."""
    typer.secho(f"interrupted: finished shards under {out} are kept; rerun the same command to resume",
                fg=typer.colors.YELLOW, err=True)
    raise typer.Exit(130)


def _report_result(result: dict, out: str, quarantined_noun: str, table: str) -> None:
    """The end of a run on the terminal: stage timings, quarantined count, the report, where to query."""
    timings = "  ".join(f"{k} {v:.1f}s" for k, v in result["timings"].items())
    typer.echo(f"stages: {timings}  (computed {result['computed_shards']} shards, "
               f"{result['skipped_shards']} already complete)", err=True)
    if result.get("quarantined"):
        typer.echo(f"warning: {result['quarantined']} {quarantined_noun} quarantined; see the errors table "
                   f"(densepure sql {out} \"SELECT * FROM errors\")", err=True)
    typer.echo(result["report"])
    typer.echo(f"results: {out}  (query them: densepure sql {out} \"SELECT * FROM {table}\")", err=True)


class _NoTraceback(logging.Filter):
    """Console only: no Prefect error record at all; the CLI prints the error once, as ``error:``.

    A failed run used to show the same message three times (the task failed, the task's state,
    the flow failed), with traceback fragments, before the CLI's own line. The records still
    reach the Prefect API handlers of the task and flow loggers (which run before the root
    logger's console handler this filter sits on), so the Prefect UI keeps them with tracebacks.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and record.name.startswith("prefect"))


def _quiet_console_tracebacks() -> None:
    for handler in logging.getLogger().handlers:
        if type(handler).__name__ == "PrefectConsoleHandler" and not any(
                isinstance(f, _NoTraceback) for f in handler.filters):
            handler.addFilter(_NoTraceback())


def _check_ray(address: str | None) -> None:
    """A --ray-address that nothing answers ends here, in seconds, before anything is planned."""
    if address:
        from tasks.common.raypool import RayAddressError, check_ray_address

        try:
            check_ray_address(address)
        except RayAddressError as exc:
            _fail(str(exc), 1)


def _load(config: Path | None, overrides: list[str], *, job: str = "certify"):
    """Load and validate the config of ``job`` (certify, attack, train-addt); a bad one ends as ``error:``."""
    from densepure_core.config import ConfigError, load_config, packaged_config

    model, default = None, DEFAULT_CONFIG
    if job == "attack":
        from densepure_core.config.attack import AttackConfig as model
        default = DEFAULT_ATTACK_CONFIG
    elif job == "train-addt":
        from densepure_core.config.addt import AddtConfig as model
        default = DEFAULT_ADDT_CONFIG
    path = config or packaged_config(default)
    try:
        return load_config(path, overrides, model=model)
    except ConfigError as exc:
        _fail(str(exc))


@app.command()
def certify(
    config: Path = typer.Option(None, "--config", "-c", help="YAML config file or packaged preset name "
                                "(imagenet_dds, imagenet_densepure, cifar10_dds, cifar10_densepure); default: the "
                                "packaged 'default' (bundled digits models and data)."),
    out: str = typer.Option(None, "--out", "-o", help="Output directory or s3://bucket/prefix (default: the config's out)."),
    ray_address: str = typer.Option(None, "--ray-address", help="Join an existing Ray cluster (default: local Ray on loopback)."),
    set_: list[str] = typer.Option([], "--set", help="Override a config field: key=value (dotted keys, YAML values)."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Publish accuracy even if images are missing."),
):
    """Certify a dataset: plan shards, vote on Ray actors, aggregate with DuckDB, write the report."""
    cfg = _load(config, set_)
    _check_ray(ray_address)
    from flows.certify import run_certify

    _quiet_console_tracebacks()
    out = out or cfg.out
    typer.echo(f"densepure certify: run '{cfg.run_name}' -> {out} "
               f"({len(cfg.sigmas)} sigma x {len(cfg.methods)} methods, n0={cfg.n0}, n={cfg.n}, alpha={cfg.alpha})",
               err=True)
    try:
        result = run_certify(cfg, out=out, ray_address=ray_address, allow_partial=allow_partial)
    except KeyboardInterrupt:
        _interrupted(out)
    except Exception as exc:  # noqa: BLE001 - every failure ends as one clear message, no traceback
        _fail_with_cause(exc, out)
    _report_result(result, out, "image(s)", "accuracy")


@app.command()
def attack(
    config: Path = typer.Option(None, "--config", "-c", help="YAML config file or packaged preset name "
                                "(attack_cifar10, attack_imagenet); default: the packaged 'attack_default' "
                                "(bundled digits models and data)."),
    out: str = typer.Option(None, "--out", "-o", help="Output directory or s3://bucket/prefix (default: the config's out)."),
    ray_address: str = typer.Option(None, "--ray-address", help="Join an existing Ray cluster (default: local Ray on loopback)."),
    set_: list[str] = typer.Option([], "--set", help="Override a config field: key=value (dotted keys, YAML values)."),
):
    """Attack evaluation of purification defenses: PGD-EOT with exact gradients, deterministic
    white-box and BPDA, scored over M purifications; rows per (image, defense, threat, attack)."""
    cfg = _load(config, set_, job="attack")
    _check_ray(ray_address)
    from flows.attack import run_attack_job

    _quiet_console_tracebacks()
    out = out or cfg.out
    grid = len(cfg.defenses) * len(cfg.threats) * len(cfg.attacks)
    skipped = grid - len(cfg.partitions())  # dwbox and bpda attack a purifier, never the bare classifier
    typer.echo(f"densepure attack: run '{cfg.run_name}' -> {out} ({len(cfg.defenses)} defenses x "
               f"{len(cfg.threats)} threats x {len(cfg.attacks)} attacks = {grid}"
               + (f", less {skipped} that do not apply (dwbox and bpda on the bare classifier)" if skipped else "")
               + f": {len(cfg.partitions())} partitions, M={cfg.score_purifications})", err=True)
    try:
        result = run_attack_job(cfg, out=out, ray_address=ray_address)
    except KeyboardInterrupt:
        _interrupted(out)
    except Exception as exc:  # noqa: BLE001 - every failure ends as one clear message, no traceback
        _fail_with_cause(exc, out)
    _report_result(result, out, "image-partition(s)", "attack_summary")


@app.command("train-addt")
def train_addt(
    config: Path = typer.Option(None, "--config", "-c", help="YAML config file or packaged preset name "
                                "(addt_cifar10); default: the packaged 'addt_default' (fine-tune the bundled "
                                "digits DDPM with the bundled clean classifier, minutes on 2 cores)."),
    out: str = typer.Option(None, "--out", "-o", help="Output directory or s3://bucket/prefix (default: the config's out)."),
    ray_address: str = typer.Option(None, "--ray-address", help="Join an existing Ray cluster (default: local Ray on loopback)."),
    set_: list[str] = typer.Option([], "--set", help="Override a config field: key=value (dotted keys, YAML values)."),
):
    """ADDT fine-tuning of a diffusion model (CGPO + RBGM, or the L_inf variant) on Ray Train,
    checkpointed and resumable; writes OUT/model (a diffusion source for certify and attack)."""
    cfg = _load(config, set_, job="train-addt")
    _check_ray(ray_address)
    from flows.train_addt import run_train_addt_job

    _quiet_console_tracebacks()
    out = out or cfg.out
    typer.echo(f"densepure train-addt: run '{cfg.run_name}' -> {out} ({cfg.variant}, {cfg.steps} steps x batch "
               f"{cfg.batch_size} on {cfg.workers} worker(s), checkpoint every {cfg.checkpoint_every})", err=True)
    try:
        result = run_train_addt_job(cfg, out=out, ray_address=ray_address)
    except Exception as exc:  # noqa: BLE001 - every failure ends as one clear message, no traceback
        _fail_with_cause(exc, out)
    timings = "  ".join(f"{k} {v:.1f}s" for k, v in result["timings"].items())
    typer.echo(f"stages: {timings}", err=True)
    typer.echo(result["report"])
    typer.echo(f"model: {result['model']}  (metrics: densepure sql {out} \"SELECT * FROM train_metrics\")", err=True)


@app.command()
def sql(
    locations: list[str] = typer.Argument(..., metavar="STORE_OR_OUT...",
                                          help="One or more OUTs or run stores (folders or s3:// prefixes "
                                               "holding OUTs), then the query."),
    query: str = typer.Argument(..., help="SQL over the views runs, votes, certificates, accuracy (certify), "
                                          "attacks, attack_summary (attack), train_metrics (train-addt) and "
                                          "errors; every row names its run_id."),
    alpha: float = typer.Option(None, "--alpha", help="Re-certify from the stored counts at this alpha (no GPU)."),
    fmt: str = typer.Option("table", "--format", "-f", help="table, csv or json."),
):
    """Query the results of one or many runs with DuckDB (read-only): views runs (one row per run),
    votes, certificates, accuracy (certify), attacks, attack_summary (attack), train_metrics
    (train-addt), errors, each spanning every run given; UDFs cp_lower(n_a, n, alpha),
    anytime_lower(n_a, n, alpha, bound, bound_params), norm_ppf(p), smoothing_radius(sigma, p),
    binom_pvalue(c1, c2), wilson_low/wilson_high(successes, n, confidence)."""
    from tasks.query import run_query

    if fmt not in ("table", "csv", "json"):
        _fail(f"--format {fmt!r}: choose table, csv or json")
    try:
        typer.echo(run_query(locations, query, alpha=alpha, fmt=fmt))
    except Exception as exc:  # DuckDB errors name the problem; show them without a traceback
        _fail(f"{type(exc).__name__}: {exc}", 1)


@app.command()
def report(
    out: str = typer.Argument(..., metavar="OUT_OR_STORE", help="A results directory or s3:// prefix: one run "
                              "(its report.md), or a store of runs (its history.md)."),
    radii: str = typer.Option("0,0.5,1", "--radii", help="A store's history: the radii of the certified "
                              "accuracy per run, comma-separated."),
):
    """Rebuild OUT/report.md (and, for a certification, the plot) from the stored results; for a
    store of runs, write STORE/history.md and history.png: accuracy per run over time."""
    from tasks.reports import rebuild_report

    try:  # an empty, partial or foreign OUT ends as one error: line naming what to run first
        typer.echo(rebuild_report(out, _radii(radii)))
    except Exception as exc:  # noqa: BLE001
        _fail_with_cause(exc)


def _radii(text: str) -> list[float]:
    try:
        radii = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        _fail(f"--radii {text!r}: expected comma-separated numbers, e.g. 0,0.5,1")
    if not radii or any(r < 0 for r in radii):
        _fail(f"--radii {text!r}: expected non-negative radii, e.g. 0,0.5,1")
    return radii


@app.command()
def compare(
    a: str = typer.Argument(..., metavar="A", help="The first run (an OUT)."),
    b: str = typer.Argument(..., metavar="B", help="The second run (an OUT) of the same job."),
    fmt: str = typer.Option("table", "--format", "-f", help="table, csv or json."),
    report_dir: str = typer.Option(None, "--report", help="Also write comparison.md, .png and .json there "
                                   "(a folder or s3:// prefix)."),
    radii: str = typer.Option(None, "--radii", help="Certification: radii to compare at, comma-separated "
                              "(default: A's accuracy grid)."),
    alpha: float = typer.Option(None, "--alpha", help="Certification: re-certify both runs at this alpha "
                                "from their votes (default: each run's published certificates)."),
):
    """Compare two runs of one job on the same images, image by image: certified (or robust)
    accuracy of A and B per partition, B - A with Newcombe's paired 95 % interval, and the exact
    McNemar test on the images only one run gets right. Differing config fields come first."""
    from tasks.compare import compare_runs, comparison_summary, write_comparison

    if fmt not in ("table", "csv", "json"):
        _fail(f"--format {fmt!r}: choose table, csv or json")
    try:
        cmp = compare_runs(a, b, radii=_radii(radii) if radii else None, alpha=alpha)
        if report_dir:
            md, png = write_comparison(cmp, report_dir)
    except Exception as exc:  # noqa: BLE001 - a missing run, two jobs, nothing in common: one error: line
        _fail_with_cause(exc)
    if fmt == "table":  # the runs and what differs first; CSV and JSON are the rows alone
        typer.echo("\n".join(comparison_summary(cmp)) + "\n")
    typer.echo(cmp.text(fmt))
    if report_dir:
        typer.echo(f"report: {md} (plot {png})", err=True)


@app.command()
def repair(out: str = typer.Argument(..., help="A results directory or s3:// prefix.")):
    """Make an OUT that two runs wrote at once hold one run again: shards of another run with this
    run's partition identity are relabelled (same counts), the others removed (voted again on the
    next run). The aggregate's "mixes 2 values of run_id" error names this command."""
    from tasks.common.repair import repair as _repair

    try:
        result = _repair(out)
    except Exception as exc:  # noqa: BLE001 - a missing or busy OUT: one error: line
        _fail_with_cause(exc)
    typer.echo(f"repair: {result.checked} shard file(s) checked; {len(result.relabelled)} relabelled to run "
               f"{result.run_id} (same partition identity, same counts), {len(result.removed)} removed (another "
               f"config: rerun the job to compute them again)")
    for uri in result.relabelled:
        typer.echo(f"  relabelled {uri}")
    for uri in result.removed:
        typer.echo(f"  removed {uri}")


@app.command("export-tsv")
def export_tsv(
    out: str = typer.Argument(..., help="A results directory or s3:// prefix."),
    dest: str = typer.Option(None, "--dest", help="Where to write (default OUT/tsv)."),
):
    """Write Cohen-style `idx label predict radius correct time` files, one per (sigma, method)."""
    from tasks.certify.report import export_tsv as _export

    try:
        paths = _export(out, dest)
    except Exception as exc:  # noqa: BLE001 - an empty or partial OUT: one error: line, no traceback
        _fail_with_cause(exc)
    for path in paths:
        typer.echo(path)


@app.command("train-toy")
def train_toy(
    out: Path = typer.Option(None, "--out", help="Where to write the models (default: a new dir under results/)."),
    seed: int = typer.Option(0, "--seed"),
    quick: bool = typer.Option(False, "--quick", help="A seconds-long smoke run of the same recipe."),
):
    """Train the bundled digits models (DDPM, clean and noise-trained classifiers) from scratch on CPU."""
    from densepure_core.models.toy import train_all

    out = out or Path("results") / "toy-models"
    manifest = train_all(out, seed=seed, quick=quick, log=lambda m: typer.echo(m, err=True))
    typer.echo(f"models written to {out} ({len(manifest.get('files', manifest))} entries in manifest.json)")


@config_app.command("show")
def config_show(
    config: Path = typer.Option(None, "--config", "-c", help="YAML config file or packaged preset name "
                                "(default: the packaged 'default')."),
    set_: list[str] = typer.Option([], "--set", help="Override a config field: key=value."),
):
    """Validate a config (certify; attack or train-addt when it says job: ...) and print it resolved, with its config_hash."""
    cfg = _load(config, set_, job=_config_job(config))
    typer.echo(cfg.to_yaml())
    typer.echo(f"# config_hash: {cfg.config_hash()}")


def _config_job(config: Path | None) -> str:
    """The job a config (a file or preset) is for: its ``job:`` field, else ``certify``."""
    if config is None:
        return "certify"
    import yaml

    from densepure_core.config import ConfigError, resolve_config_path

    try:
        data = yaml.safe_load(resolve_config_path(config).read_text())
    except (OSError, ConfigError, yaml.YAMLError, UnicodeDecodeError):
        return "certify"  # load_config reports it
    job = data.get("job") if isinstance(data, dict) else None
    return job if job in ("attack", "train-addt") else "certify"


def main() -> None:  # pragma: no cover
    app(sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    main()
