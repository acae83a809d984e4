"""`constellation calibrate`: shear calibration sims through the production estimator (m, c with errors)."""

from __future__ import annotations

import json
import math

import click

from constellation_assets.cli import config_option, load_cli_config

__all__ = ["register"]


def _fmt(value: float, err: float) -> str:
    return f"{value:+.2e} ± {err:.1e}"


@click.command("calibrate")
@config_option
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@click.option(
    "--field",
    "field_level",
    is_flag=True,
    help="field-level calibration: paired synthetic fields (+/-g, 0/90 deg) through the whole production "
    "path (simulate -> prepare -> infer -> assemble), matched by OBJECT_ID; m and c overall and in bins",
)
@click.option("--n-galaxies", type=int, default=None, help="galaxies (each gives 4 stamps: +/-g x 0/90 deg)")
@click.option("--g-true", type=float, default=None, help="applied shear")
@click.option("--population", type=click.Choice(["sersic", "bulge_disk", "cosmos", "fixed"]), default=None)
@click.option("--psf-model", type=click.Choice(["moffat", "gaussian"]), default=None)
@click.option("--psf-fwhm-arcsec", type=float, default=None)
@click.option("--noise-sigma", type=float, default=None, help="per-pixel noise std (0: noiseless)")
@click.option("--seed", type=int, default=None)
@click.option("--snr-max", type=float, default=None, help="upper end of the matched-filter S/N range")
@click.option("--psf-g1", type=float, default=None, help="PSF ellipticity (reduced shear) component 1")
@click.option("--psf-g2", type=float, default=None, help="PSF ellipticity (reduced shear) component 2")
@click.option(
    "--noise-realizations",
    "n_noise_realizations",
    type=int,
    default=None,
    help="noise fields per galaxy (noisy runs)",
)
@click.option("--stamp-size-pix", type=int, default=None)
@click.option("--device", default=None, help="cpu, cuda or auto (default: the config's compute.device)")
@click.option(
    "--figure",
    "figure_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="also write the fit figure (PNG) here",
)
def calibrate_cmd(
    config_path,
    as_json,
    n_galaxies,
    g_true,
    population,
    psf_model,
    psf_fwhm_arcsec,
    noise_sigma,
    seed,
    figure_path,
    field_level,
    **extra,
) -> None:
    """Measure the multiplicative (m) and additive (c) shear bias of the estimator on image sims.

    Flags that are also calibration config keys follow the config precedence (values in --config win);
    the others (S/N range, PSF ellipticity, noise realisations, stamp size, device) apply directly.

    With --field, the synthetic field of the config's `field` section is run through the production path
    in paired fields (see constellation_assets/shear/field_calibration.py); settings come from the config
    (calibration.field_*), the isolated-stamp flags do not apply.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from constellation_assets.shear.calibration import calibration_figure_png, run_calibration

    flags = {
        "calibration.n_galaxies": n_galaxies,
        "calibration.g_true": g_true,
        "calibration.population": population,
        "calibration.psf_model": psf_model,
        "calibration.psf_fwhm_arcsec": psf_fwhm_arcsec,
        "calibration.noise_sigma": noise_sigma,
        "calibration.seed": seed,
    }
    cfg = load_cli_config(config_path, flags)
    direct = {k: v for k, v in extra.items() if v is not None}
    if field_level:
        given = sorted(k for k, v in {**flags, **direct}.items() if v is not None)
        if given:
            raise click.UsageError(
                f"--field takes its settings from the config (calibration.field_*, field.*); "
                f"drop {', '.join('--' + k.split('.')[-1].replace('_', '-') for k in given)}"
            )
        _calibrate_field(cfg, as_json, figure_path)
        return
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("calibrate"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=as_json,
    )
    task = progress.add_task("galaxies", total=cfg.calibration.n_galaxies)
    try:
        with progress:
            result = run_calibration(
                cfg, progress=lambda done, total: progress.update(task, completed=done, total=total), **direct
            )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    if figure_path:
        with open(figure_path, "wb") as fh:
            fh.write(
                calibration_figure_png(result, cfg.calibration.m_requirement, cfg.calibration.c_requirement)
            )
    m_req, c_req = cfg.calibration.m_requirement, cfg.calibration.c_requirement
    payload = result.to_dict()
    payload["m_requirement"], payload["c_requirement"] = m_req, c_req
    payload["within_requirement"] = result.within(m_req, c_req)
    if as_json:
        click.echo(
            json.dumps(
                {
                    k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v)
                    for k, v in payload.items()
                },
                indent=2,
            )
        )
        return
    table = Table(
        title=f"Shear calibration: {result.n_galaxies} galaxies, {result.n_stamps} stamps, "
        f"g_true={result.g_true}, {result.seconds:.1f} s"
    )
    table.add_column("component")
    table.add_column("m", justify="right")
    table.add_column("c", justify="right")
    table.add_row("1", _fmt(result.m1, result.m1_err), _fmt(result.c1, result.c1_err))
    table.add_row("2", _fmt(result.m2, result.m2_err), _fmt(result.c2, result.c2_err))
    Console().print(table)
    verdict = "within" if payload["within_requirement"] else "OUTSIDE"
    click.echo(f"{verdict} requirement |m| < {m_req:g}, |c| < {c_req:g} (central values)")


def _calibrate_field(cfg, as_json: bool, figure_path: str | None) -> None:
    from rich.console import Console

    from constellation_assets.shear.field_calibration import (
        FieldCalibrationError,
        field_calibration_figure_png,
        field_calibration_selection_tables,
        field_calibration_table,
        run_field_calibration,
    )

    m_req, c_req = cfg.calibration.m_requirement, cfg.calibration.c_requirement
    try:
        res = run_field_calibration(cfg, progress=not as_json, console=Console(stderr=True))
    except FieldCalibrationError as exc:
        raise click.ClickException(str(exc)) from exc
    if figure_path:
        with open(figure_path, "wb") as fh:
            fh.write(field_calibration_figure_png(res, m_req))
    payload = res.to_dict()
    payload["within_requirement"] = res.within(m_req, c_req)
    if as_json:
        click.echo(json.dumps(payload, indent=2))
        return
    out = Console()
    for table in (*field_calibration_table(res), *field_calibration_selection_tables(res)):
        out.print(table)
    verdict = "within" if payload["within_requirement"] else "OUTSIDE"
    click.echo(
        f"{verdict} requirement |m| < {m_req:g}, |c| < {c_req:g} (central values); "
        f"{res.seconds.get('total', 0):.0f} s, work dir {res.work_dir}"
    )


def register(main: click.Group) -> None:
    main.add_command(calibrate_cmd)
