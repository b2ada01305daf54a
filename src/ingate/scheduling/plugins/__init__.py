"""Scheduling plugins, one module per family."""
