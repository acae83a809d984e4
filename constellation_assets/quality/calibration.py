"""Checks of a shear calibration: |m| and |c| against the requirement, with the 1-sigma errors."""

from __future__ import annotations

from collections.abc import Mapping

from constellation_assets.quality.checks import CheckOutcome

BIAS_KEYS = ("m1", "m1_err", "m2", "m2_err", "c1", "c1_err", "c2", "c2_err")


def calibration_outcomes(
    biases: Mapping[str, float], m_requirement: float, c_requirement: float
) -> list[CheckOutcome]:
    """m_within_requirement and c_within_requirement (severity warn) from m1, m2, c1, c2 and their errors."""
    m_abs = max(abs(float(biases["m1"])), abs(float(biases["m2"])))
    c_abs = max(abs(float(biases["c1"])), abs(float(biases["c2"])))
    m_md = {k: float(biases[k]) for k in ("m1", "m1_err", "m2", "m2_err")}
    c_md = {k: float(biases[k]) for k in ("c1", "c1_err", "c2", "c2_err")}
    return [
        CheckOutcome(
            "m_within_requirement",
            bool(m_abs < m_requirement),
            "warn",
            f"max |m| = {m_abs:.2e} vs requirement {m_requirement:.1e}",
            {**m_md, "requirement": float(m_requirement)},
        ),
        CheckOutcome(
            "c_within_requirement",
            bool(c_abs < c_requirement),
            "warn",
            f"max |c| = {c_abs:.2e} vs requirement {c_requirement:.1e}",
            {**c_md, "requirement": float(c_requirement)},
        ),
    ]
