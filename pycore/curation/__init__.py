"""Curation: scanning, bucket tables and assignment, the batch sampler, and dedup."""
