"""`constellation calibrate` end to end through click."""

from __future__ import annotations

import json

from click.testing import CliRunner

from constellation_assets.cli import main


def test_calibrate_json_and_table(tmp_path):
    runner = CliRunner()
    res = runner.invoke(
        main, ["calibrate", "--json", "--n-galaxies", "6", "--stamp-size-pix", "32", "--population", "fixed"]
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout[res.stdout.index("{") :])
    assert data["n_galaxies"] == 6 and data["n_stamps"] == 24
    assert abs(data["m1"]) < 3e-3 and data["m1_err"] > 0 and "within_requirement" in data

    fig = tmp_path / "fit.png"
    res = runner.invoke(
        main, ["calibrate", "--n-galaxies", "4", "--stamp-size-pix", "32", "--figure", str(fig)]
    )
    assert res.exit_code == 0, res.output
    assert "m" in res.stdout and "requirement" in res.stdout
    assert fig.read_bytes()[:4] == b"\x89PNG"


def test_calibrate_bad_input_exits_nonzero():
    res = CliRunner().invoke(
        main, ["calibrate", "--n-galaxies", "4", "--stamp-size-pix", "32", "--psf-g1", "0.9"]
    )
    assert res.exit_code != 0
