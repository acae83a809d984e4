"""``python -m constellation_assets.cli``: the ``constellation`` command."""

from constellation_assets.cli import main

if __name__ == "__main__":
    main(prog_name="constellation")
