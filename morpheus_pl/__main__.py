"""``python -m morpheus_pl``: the command-line interface."""

import sys

from morpheus_pl.cli import main

if __name__ == "__main__":
    # argparse names the program after argv[0], which is this file's path here.
    sys.argv[0] = "python -m morpheus_pl"
    main()
