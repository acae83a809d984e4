"""``constellation infer --config C MANIFESTS... [--device cpu|cuda|auto] [--batch-size N] [--force] [--json]``."""

from __future__ import annotations

import json
import math

import click

from constellation_assets.cli import config_option, load_cli_config


def register(main: click.Group) -> None:
    main.add_command(infer_command)


@click.command("infer")
@config_option
@click.argument("manifests", nargs=-1, required=True, metavar="MANIFEST...")
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda", "auto"]),
    default=None,
    help="torch device (default: compute.device)",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1),
    default=None,
    help="stamps per estimator batch (default: compute.batch_size)",
)
@click.option(
    "--force", is_flag=True, help="recompute sub-tiles whose result already exists with the same config"
)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object per sub-tile instead of a table")
def infer_command(config_path, manifests, device, batch_size, force, as_json) -> None:
    """Measure shear on sub-tile manifests (files, or folders/prefixes of *.yaml manifests).

    Writes {output.results}/{tile_id}/{TILE}_{ROW}_{COL}.parquet per sub-tile; existing results with the same
    config are skipped unless --force. Exit status 1 if any sub-tile failed (the others still run).
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from constellation_assets.shear.worker import expand_manifests, run_manifests

    cfg = load_cli_config(config_path, {"compute.device": device, "compute.batch_size": batch_size})
    try:
        uris = expand_manifests(manifests, cfg.storage_options)
    except (FileNotFoundError, OSError) as exc:
        raise click.UsageError(str(exc)) from None
    console = Console(stderr=True)
    results, failures = [], []
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stamps]} stamps"),
        TimeElapsedColumn(),
        console=console,
        transient=as_json,
    ) as bar:
        task = bar.add_task("sub-tiles", total=len(uris), stamps=0)

        def on_progress(n: int) -> None:
            bar.update(task, stamps=bar.tasks[task].fields["stamps"] + n)

        def on_result(r) -> None:
            if as_json:
                click.echo(json.dumps(r.to_metadata(), default=str))
            bar.advance(task)

        # The sub-tiles of one tile are measured together (each quadrant read once per tile).
        results, failures = run_manifests(
            cfg,
            uris,
            None,
            None,
            force=force,
            progress=on_progress,
            on_result=on_result,
            on_error=lambda uri, exc: bar.advance(task),
        )
    if not failures:  # the infer stage's run_config record, after every sub-tile result
        from constellation_assets.provenance import write_stage_record
        from constellation_assets.shear.worker import infer_record_extra

        write_stage_record(cfg, "infer", infer_record_extra(results))

    if not as_json:
        table = Table(title=f"shear inference ({cfg.compute.device}, batch {cfg.compute.batch_size})")
        for col in (
            "sub-tile",
            "status",
            "sources",
            "core",
            "measured",
            "G1",
            "G2",
            "seconds",
            "peak RSS MB",
        ):
            table.add_column(col, justify="right" if col not in ("sub-tile", "status") else "left")

        def f(v, fmt):
            return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)

        for r in results:
            table.add_row(
                f"{r.tile_id}_{r.sub_tile_row}_{r.sub_tile_col}", r.status, f(r.n_sources, "d"), f(r.n_core, "d"),
                f(r.n_measured, "d"), f(r.g1, "+.4f"), f(r.g2, "+.4f"), f(r.seconds, ".1f"), f(r.peak_rss_mb, ".0f"),
            )  # fmt: skip
        Console().print(table)
    for uri, err in failures:
        console.print(f"[red]failed[/red] {uri}: {err}")
    if failures:
        raise SystemExit(1)
