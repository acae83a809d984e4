"""`constellation psf`: PSF-model quality, as shear response to model errors and as rho statistics on stars."""

from __future__ import annotations

import json
import math

import click

from constellation_assets.cli import config_option, load_cli_config

__all__ = ["register"]


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def _pm(value: float, err: float, fmt: str = "+.3f") -> str:
    return f"{value:{fmt}} ± {err:.1g}" if math.isfinite(err) else f"{value:{fmt}}"


@click.group("psf")
def psf_group() -> None:
    """PSF-model errors: shear leakage and size response on image sims; rho statistics against stars."""


@psf_group.command("errors")
@config_option
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@click.option("--n-galaxies", type=int, default=None, help="galaxies (each 4 stamps: +/-g x 0/90 deg)")
@click.option("--psf-model", type=click.Choice(["moffat", "gaussian", "airy_gaussian"]), default=None)
@click.option("--psf-fwhm-arcsec", type=float, default=None)
@click.option("--moffat-beta", type=float, default=None)
@click.option("--population", type=click.Choice(["sersic", "bulge_disk", "cosmos", "fixed"]), default=None)
@click.option("--dg-psf", type=float, default=0.01, show_default=True, help="model ellipticity error (+/-)")
@click.option("--size-error", type=float, default=0.02, show_default=True, help="model dT/T (+/-)")
@click.option("--stamp-size-pix", type=int, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--device", default=None, help="cpu, cuda or auto (default: the config's compute.device)")
def psf_errors_cmd(config_path, as_json, dg_psf, size_error, **direct) -> None:
    """Shear bias from PSF-model errors: c = alpha dg_PSF and m = beta dT/T on the calibration sims.

    Galaxies are drawn with the true PSF and measured with models that differ from it by +/-dg_PSF (each
    component) or +/-dT/T; the same stamps for every model, so the differences are nearly noise-free. Also
    prints the model accuracy the config's calibration requirement (|m|, |c|) implies.
    """
    from rich.console import Console
    from rich.table import Table

    from constellation_assets.shear.psf_errors import run_psf_error_response

    cfg = load_cli_config(config_path)
    kw = {k: v for k, v in direct.items() if v is not None}
    try:
        r = run_psf_error_response(
            cfg,
            dg_psf=dg_psf,
            size_error=size_error,
            m_requirement=cfg.calibration.m_requirement,
            c_requirement=cfg.calibration.c_requirement,
            noise_sigma=0.0,
            **kw,
        )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(_json_safe(r.to_dict()), indent=2))
        return
    t = Table(
        title=f'PSF-model error response ({r.psf_model}, FWHM {r.config["psf_fwhm_arcsec"]}"'
        + (f", beta {r.config['moffat_beta']}" if r.psf_model == "moffat" else "")
        + f"; {r.config['population']}, {r.n_galaxies} galaxies, dg={r.dg_psf}, "
        f"dT/T={r.size_error}, {r.seconds:.1f} s)"
    )
    for col in ("quantity", "value", "meaning"):
        t.add_column(col)
    t.add_row("alpha1", _pm(r.alpha1, r.alpha1_err), "c1 / dg_PSF,1")
    t.add_row("alpha2", _pm(r.alpha2, r.alpha2_err), "c2 / dg_PSF,2")
    t.add_row("dm/d(dT/T)", _pm(r.dm_dsize, r.dm_dsize_err), "m per model size error (model - true)")
    t.add_row("|dg_PSF| max", f"{r.dg_psf_max:.2e}", f"for |c| < {r.c_requirement:g}")
    t.add_row("|dT/T| max", f"{r.size_error_max:.2e}", f"for |m| < {r.m_requirement:g}")
    Console().print(t)


@psf_group.command("rho")
@config_option
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@click.option("--tile", "tile_ids", type=int, multiple=True, help="MER tile(s) (default: the config's tiles)")
@click.option("--snr-min", type=float, default=50.0, show_default=True, help="star detection S/N cut")
@click.option("--min-sep-arcsec", type=float, default=2.0, show_default=True)
@click.option("--max-sep-arcsec", type=float, default=600.0, show_default=True)
@click.option("--n-bins", type=int, default=8, show_default=True)
def psf_rho_cmd(config_path, as_json, tile_ids, snr_min, min_sep_arcsec, max_sep_arcsec, n_bins) -> None:
    """rho1..rho5 (Jarvis et al. 2016) of the PSF model against the MER catalog's stars, per tile.

    Stars (POINT_LIKE_FLAG, S/N >= --snr-min, unsaturated, unblended) are measured in every quadrant exposure
    covering the tile and compared with the PSF model interpolated to them; errors are jackknife over
    quadrant exposures.
    """
    from rich.console import Console
    from rich.table import Table

    from constellation_assets.quality.psf import RHO_NAMES, tile_psf_rho

    cfg = load_cli_config(config_path)
    ids = [int(t) for t in (tile_ids or cfg.selected_tile_ids)]
    out = []
    for tile_id in ids:
        try:
            rho, _ = tile_psf_rho(
                cfg,
                tile_id,
                snr_min=snr_min,
                min_sep_arcsec=min_sep_arcsec,
                max_sep_arcsec=max_sep_arcsec,
                n_bins=n_bins,
            )
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc
        out.append(rho)
    if as_json:
        click.echo(json.dumps(_json_safe([r.to_dict() for r in out]), indent=2))
        return
    console = Console()
    for r in out:
        console.print(
            f"tile {r.config['tile_id']}: {r.n_stars} stars, {r.n_measurements} star-exposures, "
            f"{r.n_patches} quadrant exposures; mean de1 = {_pm(r.mean_de1, r.mean_de1_err, '+.2e')}, "
            f"de2 = {_pm(r.mean_de2, r.mean_de2_err, '+.2e')}, "
            f"dT/T = {_pm(r.mean_dT_over_T, r.mean_dT_over_T_err, '+.2e')}"
        )
        t = Table(title=f"rho statistics, tile {r.config['tile_id']} (xi_+, 1-sigma jackknife)")
        t.add_column("theta arcsec", justify="right")
        t.add_column("pairs", justify="right")
        for name in RHO_NAMES:
            t.add_column(name, justify="right")
        for b, theta in enumerate(r.theta_arcsec):
            t.add_row(
                f"{theta:.1f}",
                str(r.n_pairs[b]),
                *(_pm(r.rho[n][b], r.rho_err[n][b], "+.1e") for n in RHO_NAMES),
            )
        console.print(t)


def register(main: click.Group) -> None:
    main.add_command(psf_group)
