"""`python -m bmi.cli`: the `bmi` command."""
import sys

from . import main

sys.exit(main())
