"""`constellation simulate-field` and `constellation prepare`: Q1-layout data and sub-tile manifests."""

from __future__ import annotations

import json

import click

from constellation_assets.cli import config_option, load_cli_config

__all__ = ["register"]


def _user_errors() -> tuple[type[BaseException], ...]:
    from constellation_assets.io.mer_catalog import MerCatalogError
    from constellation_assets.io.uri import DataAccessError
    from constellation_assets.prepare import ManifestError

    return (DataAccessError, MerCatalogError, ManifestError, FileExistsError, ValueError)


@click.command("simulate-field")
@config_option
@click.option("--tile-id", "tile_ids", type=int, multiple=True, help="simulate only these tiles (repeatable)")
@click.option("--force", is_flag=True, help="regenerate tiles even if complete (replaces their files)")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
def simulate_field_cmd(config_path, tile_ids, force, as_json) -> None:
    """Write the synthetic Euclid field (VIS DET/BKG/WGT/PSF, MER catalogs, truth) in the Q1 layout.

    Files go under data.vis_base_uri and data.catalog_base_uri (local or s3://); complete tiles are skipped.
    """
    from constellation_assets.synthetic import simulate_field

    cfg = load_cli_config(config_path)
    if tile_ids:
        cfg = cfg.model_copy(update={"field": cfg.field.model_copy(update={"tile_ids": list(tile_ids)})})
    try:
        summary = simulate_field(cfg, force=force, progress=not as_json)
    except _user_errors() as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2, default=str))
        return
    for t in summary.tiles:
        state = "up to date" if t.skipped else "written"
        click.echo(
            f"tile {t.tile_id}: {state}; obs {t.obs_ids}, {t.n_galaxies} galaxies, {t.n_stars} stars, "
            f"{t.n_catalog_rows} MER rows, G1_TRUE={t.g1_true:+.4f} G2_TRUE={t.g2_true:+.4f}, {len(t.files)} files"
        )
    click.echo(f"{summary.n_files} files, config hash {summary.config_hash}, {summary.seconds:.1f} s")


@click.command("prepare")
@config_option
@click.option("--tile-id", "tile_ids", type=int, multiple=True, help="prepare only these tiles (repeatable)")
@click.option("--force", is_flag=True, help="rewrite manifests even if up to date")
@click.option("--json", "as_json", is_flag=True, help="print the per-tile results as JSON")
def prepare_cmd(config_path, tile_ids, force, as_json) -> None:
    """Discover Q1 data, select shear-grade sources, partition and write one manifest per sub-tile."""
    from constellation_assets.prepare import prepare

    cfg = load_cli_config(config_path)
    try:
        results = prepare(cfg, list(tile_ids) or None, progress=not as_json, force=force)
    except _user_errors() as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in results], indent=2, default=str))
        return
    for r in results:
        state = "up to date" if r.skipped else "written"
        click.echo(
            f"tile {r.tile_id}: {len(r.manifest_uris)} manifests {state}; {r.n_sources} sources "
            f"({r.n_core} in cores), {r.n_quadrants} quadrants -> {r.manifest_uris[0].rsplit('/', 1)[0]}"
        )


def register(main: click.Group) -> None:
    main.add_command(simulate_field_cmd)
    main.add_command(prepare_cmd)
