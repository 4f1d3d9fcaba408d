"""`python -m bench ...` is `hymirec bench ...`."""

import sys

from hymirec.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
