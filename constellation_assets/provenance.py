"""Effective-config records: what ran, when, with which code, reproducibly.

Every run writes ``{output}/{stage_dir}/{variant}/run_config_{experiment_id}.json`` (the Gen5 seed's audit
trail), where ``stage_dir`` is ``phase{stage}`` for injection runs (``phase4c``) and the stage name
(``prepare``, ``infer``, ``assemble``, ``calibrate``) for shear runs. The record holds the full validated config,
``execution_timestamp_utc`` (ISO 8601, ``Z``), engine versions, the git commit when available, and a
``config_hash`` over the output-determining settings (not timestamps or compute placement) and, for the whole
config, the resolved data and output locations: two runs that must produce identical outputs in the same place
share a hash, and runs on other files or another catalog never do. The record loads back as a config
(:func:`constellation_assets.config.load_config`), which is how ``constellation reproduce`` works.

Secrets never enter a record: credentials in URIs and any key that looks like a secret are redacted.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from constellation_assets import __version__
from constellation_assets.io.uri import atomic_write_text, join_uri, read_text, uri_exists

__all__ = [
    "RunConflictError",
    "check_idempotency",
    "config_hash",
    "effective_config_record",
    "hash_payload",
    "redact",
    "run_config_uri",
    "utc_timestamp",
    "versions",
    "write_run_config",
]

#: Settings that locate data or place compute but do not change the numbers produced.
NON_DETERMINING_KEYS = frozenset(
    {
        "vis_base_uri",
        "catalog_base_uri",
        "s3",
        "output",
        "compute",
        "output_uri",
        "force",
        "cosmos_bank_h5",  # the bank's content hash is recorded instead when it is used
        "lease_timeout_s",  # how concurrent runs are kept apart, not what they produce
        "lease_wait_s",
    }
)

SECRET_KEY_RE = re.compile(r"(secret|password|passwd|token|credential|api[_-]?key|access[_-]?key)", re.I)
URI_CREDENTIALS_RE = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<cred>[^/@\s]+)@")
QUERY_SECRET_RE = re.compile(
    r"(?P<k>(X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|password|token|sig))=(?P<v>[^&\s]+)", re.I
)
REDACTED = "***REDACTED***"

ENGINES = ("dagster", "torch", "galsim", "pyiceberg", "numpy", "pyarrow", "polars", "astropy")


class RunConflictError(RuntimeError):
    """An output location holds a completed run with a different config_hash."""


def utc_timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@functools.cache
def versions() -> dict[str, str]:
    out = {"constellation": __version__, "python": platform.python_version()}
    for name in ENGINES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


@functools.cache
def git_commit() -> str | None:
    """The commit of the source tree when it is a git checkout (None for an installed wheel)."""
    here = Path(__file__).resolve().parent
    try:
        res = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = res.stdout.strip()
    return sha if res.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", sha) else None


def redact(obj: Any) -> Any:
    """Copy of ``obj`` with secrets removed: secret-looking keys, credentials in URIs, signed-URL parameters."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if isinstance(k, str) and SECRET_KEY_RE.search(k) and v not in (None, "", False):
                out[k] = REDACTED
            else:
                out[k] = redact(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        s = URI_CREDENTIALS_RE.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", obj)
        return QUERY_SECRET_RE.sub(lambda m: f"{m.group('k')}={REDACTED}", s)
    return obj


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in sorted(obj.items()) if k not in NON_DETERMINING_KEYS}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def hash_payload(cfg, sections: tuple[str, ...] | None = None) -> dict:
    """The output-determining part of a config (what :func:`config_hash` hashes).

    ``sections`` limits it to the top-level keys a stage's outputs depend on (e.g. an injection run does not
    depend on the shear estimator settings); None hashes every section.
    """
    body = cfg.model_dump(mode="json")
    if sections is not None:
        body = {k: v for k, v in body.items() if k in sections}
    return _strip(body)


def resolved_locations(cfg) -> dict:
    """Where a run reads its data and writes its outputs, resolved (relative local paths made absolute), so
    two runs on the same settings but different files or catalogs never share a whole-config hash."""

    def resolve(uri) -> str:
        uri = str(uri)
        return uri if "://" in uri else str(Path(uri).expanduser().absolute())

    out = {
        "vis_base_uri": resolve(cfg.data.vis_base_uri),
        "catalog_base_uri": resolve(cfg.data.catalog_base_uri),
        "output_root_uri": resolve(cfg.output.root_uri),
    }
    try:
        out["catalog_uri"] = str(cfg.output.catalog)
    except ValueError:  # S3 output without a catalog URI: the config is rejected where the catalog opens
        out["catalog_uri"] = None
    return out


def config_hash(cfg, extra: dict | None = None, sections: tuple[str, ...] | None = None) -> str:
    """Stable sha256 (first 16 hex) over the output-determining settings (and ``extra``, e.g. a bank hash).

    The whole-config hash (``sections=None``, the shear pipeline's) also covers the resolved data and output
    locations (:func:`resolved_locations`); a hash over ``sections`` (an injection run's) does not, so
    ``reproduce --output elsewhere`` keeps it.
    """
    payload = {"config": hash_payload(cfg, sections), "extra": extra or {}}
    if sections is None:
        payload["locations"] = resolved_locations(cfg)
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def effective_config_record(
    cfg, stage: str, extra: dict | None = None, sections: tuple[str, ...] | None = None
) -> dict:
    """The effective-config record of a run: config + provenance, redacted, JSON-serialisable.

    The record always holds the whole config; ``sections`` only narrows what ``config_hash`` covers.
    """
    record: dict[str, Any] = {
        "record_type": "constellation.run_config/v1",
        "stage_dir": stage,
        "execution_timestamp_utc": utc_timestamp(),
        "config_hash": config_hash(cfg, extra, sections),
        "versions": versions(),
        "git_commit": git_commit(),
    }
    inj = cfg.injection
    # The seed's flat keys first, so the record reads like the seed's run_config.
    flat = {
        "stage": inj.stage,
        "variant": inj.variant,
        "experiment_id": inj.experiment_id,
        "source_mode": inj.source_mode,
        "cosmos_bank_h5": inj.cosmos_bank_h5,
        "cosmos_salt": inj.cosmos_salt,
        "seed_base": inj.seed_base,
        "psf_model": inj.psf_model,
        "moffat_beta": inj.moffat_beta,
        "split_seed": inj.split_seed,
    }
    body = cfg.model_dump(mode="json")
    out = {**flat, **body, **record}
    if extra:
        out["extra"] = extra
    return redact(out)


def run_config_uri(output_uri: str, stage_dir: str, variant: str, experiment_id: str) -> str:
    return join_uri(output_uri, stage_dir, variant, f"run_config_{experiment_id}.json")


def check_idempotency(uri: str, new_hash: str, force: bool, storage_options: dict | None = None) -> str:
    """Decide what to do with an output location: 'run', 'skip' (same hash, completed) or raise on conflict."""
    if force or not uri_exists(uri, storage_options):
        return "run"
    try:
        old = json.loads(read_text(uri, storage_options))
    except (ValueError, OSError):
        return "run"  # unreadable record: not a completed run
    if str(old.get("status") or "complete") != "complete":
        return "run"  # a started or failed run: its outputs are verified and completed by the next run
    old_hash = old.get("config_hash")
    if old_hash == new_hash:
        return "skip"
    raise RunConflictError(
        f"{uri} holds a completed run with config_hash {old_hash}, but this run's config_hash is {new_hash}. "
        "Use a new variant/experiment_id or output location, or pass --force to overwrite it."
    )


def write_run_config(
    cfg,
    output_uri: str,
    stage_dir: str,
    variant: str,
    experiment_id: str,
    *,
    extra: dict | None = None,
    storage_options: dict | None = None,
    record: dict | None = None,
) -> tuple[str, dict]:
    """Atomically write the run's effective config next to its outputs. Returns (uri, record).

    Write it last, after the outputs: its presence marks the run as complete.
    """
    record = record if record is not None else effective_config_record(cfg, stage_dir, extra)
    uri = run_config_uri(output_uri, stage_dir, variant, experiment_id)
    atomic_write_text(uri, json.dumps(record, indent=2, sort_keys=False) + "\n", storage_options)
    return uri, record


def write_stage_record(cfg, stage: str, extra: dict | None = None) -> str:
    """Write the effective config of a shear-pipeline stage (prepare, infer, assemble) next to its outputs,
    ``{output.root_uri}/{stage}/{field_name}/run_config_{field_name}.json``; returns its URI.

    The stage functions call it last, so the CLI stages, ``constellation run`` and the Dagster assets (which
    call the same functions) leave the same record.
    """
    uri, _ = write_run_config(
        cfg,
        cfg.output.root_uri,
        stage,
        cfg.field_name,
        cfg.field_name,
        extra=extra,
        storage_options=cfg.storage_options(cfg.output.root_uri),
    )
    return uri
