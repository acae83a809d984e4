"""The Dagster code location: the Definitions object, nothing else (wiring lives in ``defs/``)."""

from constellation_assets.defs import defs

__all__ = ["defs"]
