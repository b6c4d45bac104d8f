"""`python -m mathforge.server MODEL_DIR ...` = `mathforge serve MODEL_DIR ...`."""

import sys

from mathforge.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
