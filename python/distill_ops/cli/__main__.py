"""`python -m distill_ops.cli`: the `distill-ops` command."""

import sys

from . import main

sys.exit(main())
