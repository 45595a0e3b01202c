"""`python -m lmadapt`: the CLI, also how `lmadapt compare` runs each method in its own process."""

import sys

from lmadapt.cli import main

sys.exit(main())
