"""Scheduling: filters -> weighted scorers -> picker, run per profile (see framework.py)."""
