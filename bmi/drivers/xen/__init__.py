"""The Xen driver: PDs are PV/PVH domains built through libxl (see driver.py)."""
