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
@click.option("--json", "as_json", is_flag=True, help="print the per-tile results as JSON")
def assemble_cmd(config_path, results, run_id, require_complete, as_json) -> None:
    """Assemble sub-tile results into the Iceberg shear catalog (idempotent per-tile overwrite).

    RESULTS are result files ({TILE}_{ROW}_{COL}.parquet) or folders holding them (local or s3://);
    default: the config's output result folder.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from constellation_assets.catalog.assemble import assemble_results

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


def register(main: click.Group) -> None:
    main.add_command(assemble_cmd)
    main.add_command(validate_cmd)
