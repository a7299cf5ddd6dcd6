"""`python -m bmi.cli`: the `bmi` command."""
import sys

from . import program

sys.exit(program())
