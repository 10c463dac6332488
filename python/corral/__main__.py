"""`python -m corral`: the corral command."""

import sys

from corral.cli import main

sys.exit(main())
