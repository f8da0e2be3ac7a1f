"""``python -m morpheus_pl``: the command-line interface."""

from morpheus_pl.cli import main

if __name__ == "__main__":
    main()
