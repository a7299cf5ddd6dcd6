"""bmid, the service that owns PDs for linux:///system (see daemon.py)."""
