"""`constellation bank build` / `constellation bank info`: the COSMOS parametric source bank."""

from __future__ import annotations

import json
import sys

import click

__all__ = ["register"]


def _storage_options(uri: str, config_path: str | None) -> dict | None:
    """fsspec options for ``uri`` from the pipeline config (S3 endpoint, anon, region), if one is given."""
    from constellation_assets.io.uri import is_s3

    if not is_s3(uri):
        return None
    from constellation_assets.cli import load_cli_config

    cfg = load_cli_config(config_path)
    return cfg.storage_options(uri) or None


@click.group("bank")
def bank_group() -> None:
    """COSMOS source bank (HDF5) for cosmos-mode injections."""


@bank_group.command("build")
@click.option(
    "--cosmos-dir",
    required=True,
    type=click.Path(file_okay=False),
    help="folder with GalSim's COSMOS files (real_galaxy_catalog_*.fits, *_fits.fits, *_selection.fits)",
)
@click.option(
    "--output", "output_uri", required=True, metavar="BANK.h5|s3://", help="bank to write (atomically)"
)
@click.option(
    "--catalog-name", default=None, help="real_galaxy_catalog_*.fits to use if the folder holds several"
)
@click.option(
    "--exclusion-level",
    type=click.Choice(["none", "bad_stamp", "bad_fits", "marginal"]),
    default="marginal",
    show_default=True,
    help="GalSim COSMOSCatalog selection",
)
@click.option("--include-images", is_flag=True, help="also store unit-flux high-resolution model images")
@click.option("--stamp-size", default=96, show_default=True, help="image size (pixels) with --include-images")
@click.option(
    "--image-pixel-scale",
    default=0.03,
    show_default=True,
    help="image pixel scale (arcsec) with --include-images",
)
@click.option("--config", "config_path", default=None, metavar="PATH|s3://", help="config for S3 settings")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
def build_cmd(
    cosmos_dir,
    output_uri,
    catalog_name,
    exclusion_level,
    include_images,
    stamp_size,
    image_pixel_scale,
    config_path,
    as_json,
) -> None:
    """Build the bank from the real COSMOS catalog files (same format for the 23.5 example and full catalogs)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from constellation_assets.io.uri import DataAccessError
    from constellation_assets.sim.bank import CosmosBankError, build_cosmos_bank

    console = Console(stderr=True)
    try:
        with Progress(
            TextColumn("rendering bank images"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            disable=not include_images,
        ) as progress:
            task = progress.add_task("images", total=None)
            summary = build_cosmos_bank(
                cosmos_dir,
                output_uri,
                include_images=include_images,
                stamp_size=stamp_size,
                image_pixel_scale_arcsec=image_pixel_scale,
                exclusion_level=exclusion_level,
                catalog_name=catalog_name,
                storage_options=_storage_options(output_uri, config_path),
                progress=lambda done, total: progress.update(task, completed=done, total=total),
            )
    except (CosmosBankError, DataAccessError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        sys.exit(1)
    info = {
        "uri": summary.uri,
        "n_sources": summary.n_sources,
        "n_input": summary.n_input,
        "exclusion_level": summary.exclusion_level,
        "input_catalog": summary.input_catalog,
        "includes_images": summary.includes_images,
        "content_sha256": summary.content_sha256,
    }
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        click.echo(
            f"wrote {summary.uri}: {summary.n_sources} of {summary.n_input} COSMOS sources "
            f"(exclusion {summary.exclusion_level}), content sha256 {summary.content_sha256[:16]}..."
        )


@bank_group.command("info")
@click.argument("uri")
@click.option("--config", "config_path", default=None, metavar="PATH|s3://", help="config for S3 settings")
def info_cmd(uri, config_path) -> None:
    """Print a bank's attributes and parameter ranges as JSON (checks that it loads)."""
    import numpy as np

    from constellation_assets.io.uri import DataAccessError
    from constellation_assets.sim.bank import CosmosBankError, load_cosmos_bank

    try:
        bank = load_cosmos_bank(uri, _storage_options(uri, config_path))
    except (CosmosBankError, DataAccessError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    d = bank.data
    ranges = {
        k: [float(np.nanmin(d[k])), float(np.nanmax(d[k]))]
        for k in ("sersic_n", "hlr_arcsec", "q", "mag_auto", "model_mag_f814w")
    }
    out = {
        "uri": uri,
        "n_sources": bank.n_sources,
        "n_bulge_disk": int(np.sum(d["use_bulgefit"])),
        "images": list(bank.images.shape) if bank.images is not None else None,
        "attrs": {
            k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in bank.attrs.items()
        },
        "ranges": ranges,
    }
    click.echo(json.dumps(out, indent=2))


def register(main: click.Group) -> None:
    main.add_command(bank_group)
