"""Scraping model servers' Prometheus metrics into the datastore (per-engine name mappings)."""
