"""`python -m daemon.cli`: the tests and benchmarks run the command line this way."""

import sys

from daemon.cli import main

sys.exit(main())
