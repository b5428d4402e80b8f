"""`python -m kvlab` runs the kvlab command (kvlab/cli.py)."""

import sys

from kvlab.cli import main

sys.exit(main())
