"""`python -m prunepath ...`: the same command line as the `prunepath` script."""

import sys

from prunepath.cli import main

sys.exit(main())
