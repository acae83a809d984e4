"""`constellation inject`, `constellation reproduce`, `constellation preflight`: the Gen5 seed's injection stage.

Option names follow the seed (``--output-s3`` and ``--sweep-partitions`` are accepted as aliases). Precedence
as in the seed: built-in defaults < flags < values in ``--config``. ``--force`` is an action, not a setting:
it always applies. When ``--config`` is a saved run_config record, ``--output`` also applies on top of it
(so ``inject --config run_config.json --output NEW --force`` re-runs into NEW, like ``reproduce``).
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import click

from constellation_assets.cli import config_option, load_cli_config

__all__ = ["register"]


def _bool(value) -> bool | None:
    if value is None:
        return None
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "y", "on"):
        return True
    if v in ("0", "false", "no", "n", "off"):
        return False
    raise click.BadParameter(f"--force takes no value or one of 1/0/true/false, got {value!r}")


def _force_option(f):
    return click.option(
        "--force",
        "force",
        is_flag=False,
        flag_value="1",
        default=None,
        metavar="[1|0]",
        help="overwrite a completed run with a different config (the seed's `--force 1`; a bare --force works too)",
    )(f)


def injection_options(f):
    """The seed's options (all default to None so the config's defaults and precedence apply)."""
    opts = [
        click.option("--stage", default=None, help="stage name (default 4c): outputs go to phase{stage}/"),
        click.option(
            "--output", "--output-s3", "output", default=None, metavar="PATH|s3://", help="output root"
        ),
        click.option("--variant", default=None, help="run variant, e.g. v5_cosmos_source"),
        click.option("--experiment-id", default=None, help="experiment id (names the run_config file)"),
        click.option(
            "--source-mode", type=click.Choice(["sersic", "cosmos"]), default=None, help="default: sersic"
        ),
        click.option(
            "--cosmos-bank-h5", default=None, metavar="PATH|s3://", help="COSMOS bank (cosmos mode)"
        ),
        click.option("--cosmos-salt", default=None, help="salt of the COSMOS template choice"),
        click.option("--seed-base", type=int, default=None, help="base seed (default 42)"),
        click.option("--psf-model", type=click.Choice(["moffat", "gaussian"]), default=None),
        click.option("--moffat-beta", type=float, default=None, help="Moffat beta (default 3.5)"),
        click.option("--split-seed", type=int, default=None, help="seed of the host -> split assignment"),
        click.option("--tiers", default=None, help="comma-separated splits to produce: train,val,test"),
        click.option("--n-total-train-per-split", type=int, default=None, help="stamps per split"),
        click.option(
            "--partitions",
            "--sweep-partitions",
            "partitions",
            type=int,
            default=None,
            help="shards per split",
        ),
        click.option(
            "--bands",
            default=None,
            help="comma-separated bands (default VIS); VIS,NIR_Y,NIR_J,NIR_H cut every band from the MER mosaics",
        ),
        click.option("--stamp-size-pix", type=int, default=None, help="stamp size (default 64)"),
        _force_option,
        config_option,
    ]
    for o in reversed(opts):
        f = o(f)
    return f


_FLAG_KEYS = {
    "stage": "injection.stage",
    "output": "injection.output_uri",
    "variant": "injection.variant",
    "experiment_id": "injection.experiment_id",
    "source_mode": "injection.source_mode",
    "cosmos_bank_h5": "injection.cosmos_bank_h5",
    "cosmos_salt": "injection.cosmos_salt",
    "seed_base": "injection.seed_base",
    "psf_model": "injection.psf_model",
    "moffat_beta": "injection.moffat_beta",
    "split_seed": "injection.split_seed",
    "tiers": "injection.tiers",
    "n_total_train_per_split": "injection.n_total_train_per_split",
    "partitions": "injection.partitions",
    "bands": "injection.bands",
    "stamp_size_pix": "injection.stamp_size_pix",
}


def _default_psf_fwhm(bands: list[str]) -> dict[str, float]:
    """Default PSF FWHM (arcsec) of known bands: VIS 0.17", NISP from the MER mosaics (~0.45-0.5")."""
    from constellation_assets.synthetic import MER_BANDS, canonical_band

    out = {}
    for b in bands:
        mb = MER_BANDS.get(canonical_band(b))
        if mb is not None:
            out[b] = 0.17 if mb.psf_fwhm_arcsec is None else mb.psf_fwhm_arcsec
    return out


def _is_run_config(config_path: str | None) -> bool:
    if not config_path or not str(config_path).endswith(".json"):
        return False
    from constellation_assets.io.uri import read_text

    try:
        return str(json.loads(read_text(config_path)).get("record_type", "")).startswith(
            "constellation.run_config"
        )
    except Exception:  # noqa: BLE001 - load_cli_config reports unreadable files
        return False


def load_injection_config(config_path: str | None, flags: dict[str, Any]):
    """Config from --config and the seed's flags (defaults < flags < file; --force always applies)."""
    force = _bool(flags.pop("force", None))
    overrides: dict[str, Any] = {}
    for k, v in flags.items():
        if v is None or k not in _FLAG_KEYS:
            continue
        if k in ("tiers", "bands"):
            v = [x.strip() for x in str(v).split(",") if x.strip()]
        if k == "bands":  # known bands get their default PSF FWHM (a config file's psf_fwhm_arcsec wins)
            overrides["injection.psf_fwhm_arcsec"] = _default_psf_fwhm(v)
        overrides[_FLAG_KEYS[k]] = v
    cfg = load_cli_config(config_path, overrides)
    if force is not None:
        cfg.injection.force = force
    if flags.get("output") and _is_run_config(config_path):
        cfg.injection.output_uri = flags["output"]
    return cfg


def _user_errors() -> tuple[type[BaseException], ...]:
    from constellation_assets.catalog.tables import CatalogConfigError
    from constellation_assets.io.uri import DataAccessError
    from constellation_assets.provenance import RunConflictError
    from constellation_assets.sim.injection import InjectionError

    return (InjectionError, RunConflictError, DataAccessError, CatalogConfigError, ValueError)


def _fail(exc: BaseException) -> None:
    click.echo(f"Error: {exc}", err=True)
    sys.exit(1)


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _lenient_injection_config(config_path: str | None, flags: dict[str, Any]):
    """For preflight: (cfg, config problems). When the injection section fails validation, the rest is still
    validated and the injection section is taken as given (unvalidated), so preflight can check everything else.
    """
    from pydantic import ValidationError

    from constellation_assets import config as cm

    flags = dict(flags)
    force = _bool(flags.pop("force", None))
    overrides: dict[str, Any] = {}
    for k, v in flags.items():
        if v is None or k not in _FLAG_KEYS:
            continue
        if k in ("tiers", "bands"):
            v = [x.strip() for x in str(v).split(",") if x.strip()]
        if k == "bands":  # known bands get their default PSF FWHM (a config file's psf_fwhm_arcsec wins)
            overrides["injection.psf_fwhm_arcsec"] = _default_psf_fwhm(v)
        overrides[_FLAG_KEYS[k]] = v
    try:
        cfg = cm.load_config(config_path, overrides)
        problems: list[str] = []
    except cm.ConfigError as exc:
        problems = ["config: " + line.strip() for line in str(exc).splitlines()[1:] if line.strip()] or [
            str(exc)
        ]
        try:
            merged: dict = {}
            for key, value in overrides.items():
                cm._set_path(merged, cm.resolve_override_key(key), value)
            if config_path:
                file_dict = cm._normalise_file_dict(cm._read_config_file(config_path, None), str(config_path))
                merged = cm._deep_merge(merged, file_dict)
            inj_raw = merged.pop("injection", {}) or {}
            cfg = cm.PipelineConfig.model_validate(merged)
            defaults = cm.InjectionConfig().model_dump()
            inj = cm.InjectionConfig.model_construct(**{**defaults, **inj_raw})
            object.__setattr__(cfg, "injection", inj)
        except (cm.ConfigError, ValidationError, TypeError, ValueError):
            return None, problems
    if cfg is not None and force is not None:
        object.__setattr__(cfg.injection, "force", force)
    return cfg, problems


@click.command("inject")
@injection_options
@click.option(
    "--single", "single", default=None, metavar="TASK_ID", help="render one injection, print it, write a PNG"
)
@click.option(
    "--png",
    "png",
    default=None,
    metavar="PATH|s3://",
    help="PNG for --single (default injection_{TASK_ID}.png)",
)
@click.option(
    "--list-tasks", is_flag=True, help="print the planned task ids (split, shard, task_id) and exit"
)
@click.option(
    "--partition", "partition_keys", multiple=True, metavar="SPLIT/K", help="only these shards (repeatable)"
)
def inject_cmd(config_path, single, png, list_tasks, partition_keys, **flags) -> None:
    """Inject SIE-lensed arcs into host cutouts: Parquet stamp shards + run_config (the Gen5 seed's Stage 4c)."""
    from constellation_assets.sim import injection as inj_mod

    cfg = load_injection_config(config_path, flags)
    try:
        if list_tasks:
            for t in inj_mod.plan_tasks(cfg):
                click.echo(f"{t.split}\t{t.shard:05d}\t{t.task_id}")
            return
        if single:
            r, png_uri = inj_mod.render_single(cfg, single, png or f"injection_{single}.png")
            click.echo(json.dumps(_json_safe(inj_mod.task_summary(r)), indent=2))
            click.echo(f"PNG written: {png_uri}", err=True)
            return
        res = inj_mod.run_injection(
            cfg, partitions=list(partition_keys) or None, progress=sys.stderr.isatty()
        )
    except _user_errors() as exc:
        _fail(exc)
    if res.skipped:
        click.echo(
            f"Already complete (config_hash {res.config_hash}): {res.run_config_uri}. Use --force to redo."
        )
        return
    click.echo(f"{res.n_rows} stamps in {len(res.shard_uris)} shard(s), {res.seconds:.1f} s")
    if res.n_registered:
        click.echo(
            f"registered {res.n_registered} rows in Iceberg table {'.'.join(inj_mod.TABLE_IDENTIFIER)}"
        )
    if res.run_config_uri:
        click.echo(f"run config: {res.run_config_uri} (config_hash {res.config_hash})")
    else:
        click.echo("run incomplete: other shards are still missing (run config not written yet)")


@click.command("reproduce")
@click.argument("run_config")
@click.option(
    "--output", "--output-s3", "output", required=True, metavar="PATH|s3://", help="where to regenerate"
)
@_force_option
def reproduce_cmd(run_config, output, force) -> None:
    """Regenerate a recorded injection run (RUN_CONFIG.json, path or s3://) and check it is byte-identical."""
    from constellation_assets.sim import injection as inj_mod

    try:
        rep = inj_mod.reproduce(run_config, output, force=bool(_bool(force)), progress=sys.stderr.isatty())
    except _user_errors() as exc:
        _fail(exc)
    res = rep.result
    click.echo(f"{res.n_rows} stamps in {len(res.shard_uris)} shard(s) under {output}")
    if rep.identical:
        click.echo(f"byte-identical: all {len(res.shard_sha256)} shards match the recorded sha256")
        return
    click.echo(
        f"NOT identical: {len(rep.mismatched)} shard(s) differ {rep.mismatched[:5]}, missing {rep.missing[:5]} "
        f"(recorded config_hash {rep.recorded_config_hash}, now {res.config_hash})",
        err=True,
    )
    sys.exit(1)


@click.command("preflight")
@injection_options
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def preflight_cmd(config_path, as_json, **flags) -> None:
    """Check an injection run before starting it; lists every problem, exits 1 if there is any."""
    from constellation_assets.sim.injection import PreflightReport, preflight

    cfg, config_problems = _lenient_injection_config(config_path, flags)
    if cfg is None:
        rep = PreflightReport(config_problems, {})
    else:
        rep = preflight(cfg)
        rep.problems[:0] = config_problems
    if as_json:
        click.echo(
            json.dumps(_json_safe({"ok": rep.ok, "problems": rep.problems, "info": rep.info}), indent=2)
        )
    else:
        for k, v in rep.info.items():
            click.echo(f"  {k}: {v}")
        if "estimated_output_bytes" in rep.info:
            click.echo(f"  estimated output: {rep.info['estimated_output_bytes'] / 1e6:.1f} MB")
        if "estimated_seconds" in rep.info:
            click.echo(f"  estimated time: {rep.info['estimated_seconds']:.0f} s on this machine")
        if rep.ok:
            click.echo("preflight OK")
        else:
            click.echo(f"preflight found {len(rep.problems)} problem(s):", err=True)
            for i, p in enumerate(rep.problems, 1):
                click.echo(f"  {i}. {p}", err=True)
    if not rep.ok:
        sys.exit(1)


def register(main: click.Group) -> None:
    main.add_command(inject_cmd)
    main.add_command(reproduce_cmd)
    main.add_command(preflight_cmd)
