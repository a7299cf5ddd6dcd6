"""Linux driver: a PD is an isolated process tree."""
