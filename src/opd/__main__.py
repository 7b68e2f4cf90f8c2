"""`python -m opd …` is the `opd` command (used by `accelerate launch -m opd`)."""

import sys

from opd.cli import main

sys.exit(main())
