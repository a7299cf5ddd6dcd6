"""Integrity: measurement, TPM link, quotes, verification, sealing, event log."""
