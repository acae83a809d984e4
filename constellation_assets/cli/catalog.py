"""`constellation assemble` and `constellation validate`: the Iceberg shear catalog from the command line."""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import click

from constellation_assets.cli import config_option, load_cli_config

__all__ = ["register"]


def _user_errors() -> tuple[type[BaseException], ...]:
    from constellation_assets.catalog.assemble import AssemblyError
    from constellation_assets.catalog.schema import ResultFileError
    from constellation_assets.catalog.tables import CatalogConfigError
    from constellation_assets.io.uri import DataAccessError

    return (AssemblyError, ResultFileError, CatalogConfigError, DataAccessError, ValueError)


def _clean(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become strings ("nan", "inf")."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


@click.command("assemble")
@config_option
@click.argument("results", nargs=-1)
@click.option("--run-id", default=None, help="run id recorded in the Iceberg snapshot summaries")
@click.option(
    "--require-complete", is_flag=True, help="fail a tile that lacks any of its 16 sub-tile results"
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="tiles per Iceberg commit (default 64): one commit per table per batch keeps the per-tile cost "
    "small at survey scale",
)
@click.option("--json", "as_json", is_flag=True, help="print the per-tile results as JSON")
def assemble_cmd(config_path, results, run_id, require_complete, batch_size, as_json) -> None:
    """Assemble sub-tile results into the Iceberg shear catalog (idempotent per-tile overwrite).

    RESULTS are result files ({TILE}_{ROW}_{COL}.parquet) or folders holding them (local or s3://);
    default: the config's output result folder.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from constellation_assets.catalog.assemble import DEFAULT_BATCH_SIZE, assemble_results

    cfg = load_cli_config(config_path)
    uris = list(results) or [cfg.output.results]
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("assemble"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    )
    task = progress.add_task("tiles", total=None)
    try:
        with progress:
            done = assemble_results(
                cfg,
                uris,
                run_id=run_id,
                require_complete=require_complete,
                on_tiles_found=lambda n: progress.update(task, total=n),
                on_tile_done=lambda _r: progress.advance(task),
                batch_size=batch_size or DEFAULT_BATCH_SIZE,
            )
    except _user_errors() as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps([_clean(r.to_dict()) for r in done], indent=2))
        return
    table = Table(title=f"Assembled {len(done)} tile(s) into {cfg.output.namespace}.sources / .subtiles")
    for col in ("tile", "sources", "margin dropped", "sub-tiles", "missing", "attempts", "seconds"):
        table.add_column(col, justify="right")
    for r in done:
        table.add_row(
            str(r.tile_id),
            str(r.n_sources),
            str(r.n_margin_dropped),
            str(r.n_subtiles),
            str(len(r.missing_subtiles)),
            str(r.commit_attempts),
            f"{r.elapsed_s:.2f}",
        )
    Console().print(table)


@click.command("validate")
@config_option
@click.option("--expected", type=int, default=None, help="expected sub-tile row count (tiles x 16)")
@click.option(
    "--truth",
    default="field",
    show_default=True,
    help="table of TILE_ID, G1_TRUE, G2_TRUE (Parquet/CSV/JSON, local or s3://); 'field': the synthetic "
    "field's truth files where they exist; 'none': skip",
)
@click.option("--tile", "tiles", type=int, multiple=True, help="check only these tile ids (repeatable)")
@click.option("--n-sigma", type=float, default=4.0, show_default=True, help="truth check threshold")
@click.option("--json", "as_json", is_flag=True, help="print the outcomes as JSON")
def validate_cmd(config_path, expected, truth, tiles, n_sigma, as_json) -> None:
    """Run the quality checks on the shear catalog; exit code 1 when a check fails."""
    from rich.console import Console
    from rich.table import Table

    from constellation_assets.quality.run import all_passed, run_catalog_checks

    cfg = load_cli_config(config_path)
    try:
        outcomes = run_catalog_checks(
            cfg,
            expected=expected,
            truth=None if truth == "none" else truth,
            tile_ids=list(tiles) or None,
            n_sigma=n_sigma,
        )
    except _user_errors() as exc:
        raise click.ClickException(str(exc)) from exc
    ok = all_passed(outcomes)
    if as_json:
        click.echo(json.dumps({"passed": ok, "checks": [_clean(o.to_dict()) for o in outcomes]}, indent=2))
    else:
        table = Table(title="Shear catalog checks")
        table.add_column("check")
        table.add_column("result")
        table.add_column("details")
        for o in outcomes:
            if o.passed:
                status = "[green]PASS[/]" if o.severity == "error" else "[yellow]SKIP[/]"
            else:
                status = "[red]FAIL[/]" if o.severity == "error" else "[yellow]WARN[/]"
            table.add_row(o.name, status, o.message)
        console = Console()
        console.print(table)
        truth_check = next((o for o in outcomes if o.name == "shear_vs_truth"), None)
        if truth_check is not None and truth_check.metadata.get("tiles"):
            tt = Table(title="Recovered vs injected shear per tile")
            for col in ("tile", "g1", "g1 true", "pull1", "g2", "g2 true", "pull2"):
                tt.add_column(col, justify="right")
            for t in truth_check.metadata["tiles"][:20]:
                tt.add_row(
                    str(t["TILE_ID"]),
                    f"{t['G1']:+.4f} ± {t['G1_ERR']:.4f}",
                    f"{t['G1_TRUE']:+.4f}",
                    f"{t['PULL1']:+.2f}",
                    f"{t['G2']:+.4f} ± {t['G2_ERR']:.4f}",
                    f"{t['G2_TRUE']:+.4f}",
                    f"{t['PULL2']:+.2f}",
                )
            console.print(tt)
    if not ok:
        sys.exit(1)


@click.group("catalog")
def catalog_group() -> None:
    """Iceberg shear catalog upkeep."""


@catalog_group.command("maintain")
@config_option
@click.option("--keep-last", type=click.IntRange(min=1), default=20, show_default=True, help="snapshots kept")
@click.option(
    "--min-age-minutes",
    type=float,
    default=5.0,
    show_default=True,
    help="snapshots and data files younger than this are neither expired nor compacted",
)
@click.option(
    "--orphan-age-minutes",
    type=float,
    default=30.0,
    show_default=True,
    help="unreferenced files younger than this are kept (a running writer may still commit them)",
)
@click.option("--no-compact", is_flag=True, help="skip the compaction of small data files")
@click.option("--keep-files", is_flag=True, help="expire snapshots but delete no file")
@click.option(
    "--min-input-files",
    type=click.IntRange(min=2),
    default=8,
    show_default=True,
    help="small files a TILE_BUCKET partition needs before it is compacted",
)
@click.option("--json", "as_json", is_flag=True, help="print the maintenance report as JSON")
def maintain_cmd(
    config_path,
    keep_last,
    min_age_minutes,
    orphan_age_minutes,
    no_compact,
    keep_files,
    min_input_files,
    as_json,
) -> None:
    """Compact small files, re-group manifests, expire old snapshots and delete dead files.

    Safe while assemblies run (Dagster runs the same every 30 minutes: catalog_maintenance_schedule).
    """
    from datetime import timedelta

    from rich.console import Console
    from rich.table import Table

    from constellation_assets.catalog.maintenance import maintain_catalog
    from constellation_assets.catalog.tables import namespace_from_config, open_catalog

    cfg = load_cli_config(config_path)
    try:
        report = maintain_catalog(
            open_catalog(cfg),
            namespace_from_config(cfg),
            keep_last=keep_last,
            min_age=timedelta(minutes=min_age_minutes),
            compact=not no_compact,
            min_input_files=min_input_files,
            delete_files=not keep_files,
            orphan_age=timedelta(minutes=orphan_age_minutes),
        )
    except _user_errors() as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(_clean(report.to_dict()), indent=2))
        return
    table = Table(title=f"Catalog maintenance of {namespace_from_config(cfg)}.* ({report.elapsed_s:.1f} s)")
    for col in ("table", "files", "compacted", "written", "snapshots", "expired", "manifests", "deleted"):
        table.add_column(col, justify="right")
    for comp, exp in zip(report.compaction or [None] * len(report.expiry), report.expiry, strict=False):
        name = exp.table
        before, after = report.manifests.get(name, (0, 0))
        deleted = exp.data_files_deleted + exp.manifests_deleted + exp.manifest_lists_deleted
        deleted += report.orphans_deleted.get(name, 0)
        table.add_row(
            name.rsplit(".", 1)[-1],
            str(comp.files_before if comp else "-"),
            str(comp.files_rewritten if comp else "-"),
            str(comp.files_written if comp else "-"),
            str(exp.snapshots_before),
            str(exp.snapshots_expired),
            f"{before} -> {after}",
            str(deleted),
        )
    Console().print(table)


def register(main: click.Group) -> None:
    main.add_command(assemble_cmd)
    main.add_command(validate_cmd)
    main.add_command(catalog_group)
