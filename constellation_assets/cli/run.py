"""``constellation run``: the whole shear pipeline locally (synthetic field -> prepare -> infer -> assemble -> validate)."""

from __future__ import annotations

import json
import sys
import time

import click


def _print_summary(summary, console) -> None:
    from rich.table import Table

    t = Table(title="Checks on the Iceberg shear catalog")
    for c in ("check", "result", "detail"):
        t.add_column(c)
    for c in summary.checks:
        status = (
            "[green]pass[/]" if c.passed else ("[red]FAIL[/]" if c.severity == "error" else "[yellow]warn[/]")
        )
        t.add_row(c.name, status, c.message)
    console.print(t)

    ts = summary.tile_shear
    t = Table(title="Recovered vs injected shear per tile (inverse-variance mean over sub-tiles)")
    for c in ("tile", "sources", "g1", "g1 true", "pull1", "g2", "g2 true", "pull2"):
        t.add_column(c, justify="right", no_wrap=c in ("tile", "sources"))
    for row in ts.iter_rows(named=True):

        def f(v, fmt="{:+.4f}"):
            return "-" if v is None else fmt.format(v)

        t.add_row(
            str(row["TILE_ID"]),
            str(row.get("N_SOURCES")),
            f"{row['G1']:+.4f} ± {row['G1_ERR']:.4f}",
            f(row.get("G1_TRUE")),
            f(row.get("PULL1"), "{:+.2f}"),
            f"{row['G2']:+.4f} ± {row['G2_ERR']:.4f}",
            f(row.get("G2_TRUE")),
            f(row.get("PULL2"), "{:+.2f}"),
        )
    console.print(t)
    secs = ", ".join(f"{k} {v:.1f} s" for k, v in summary.seconds.items())
    console.print(f"catalog rows: {summary.n_sources_catalog} sources; timings: {secs}")
    for stage, uri in summary.run_configs.items():
        console.print(f"run config ({stage}): {uri}")
    for tile, why in sorted(getattr(summary, "failed_tiles", {}).items()):
        console.print(f"[bold red]tile {tile} FAILED[/] (not in the catalog): {why}")


def register(main: click.Group) -> None:
    from constellation_assets.cli import config_option, load_cli_config

    @main.command("run")
    @config_option
    @click.option("--local", is_flag=True, help="run every stage in this process tree (no Dagster needed)")
    @click.option("--no-simulate", is_flag=True, help="do not generate the synthetic field (real data)")
    @click.option("--workers", type=int, default=None, help="parallel inference processes")
    @click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default=None)
    @click.option("--json", "as_json", is_flag=True, help="print the summary as JSON on stdout")
    def run_cmd(config_path, local, no_simulate, workers, device, as_json):
        """Run the shear pipeline end to end and print recovered vs injected shear per tile."""
        from rich.console import Console

        from constellation_assets.pipeline import run_local

        if not local:
            raise click.UsageError(
                "only --local runs from the CLI; on a cluster materialize the tile partitions from Dagster "
                "(`dagster dev` or `dagster job execute -m constellation_assets.definitions -j tile_pipeline`)"
            )
        cfg = load_cli_config(config_path, {"compute.workers": workers, "compute.device": device})
        console = Console(stderr=True)
        t0 = time.perf_counter()
        summary = run_local(cfg, progress=True, simulate=not no_simulate, console=console)
        _print_summary(summary, console)
        console.print(f"[bold]total {time.perf_counter() - t0:.1f} s[/]")
        if as_json:
            out = {
                "tiles": summary.tile_ids,
                "seconds": summary.seconds,
                "checks": [
                    {"name": c.name, "passed": c.passed, "message": c.message} for c in summary.checks
                ],
                "tile_shear": summary.tile_shear.to_dicts(),
                "run_configs": summary.run_configs,
                "failed_tiles": {str(k): v for k, v in getattr(summary, "failed_tiles", {}).items()},
            }
            click.echo(json.dumps(out, indent=2, default=str))
        if not summary.passed:
            sys.exit(1)
