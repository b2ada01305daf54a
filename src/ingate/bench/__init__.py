"""Benchmark harness: workloads, an open-loop load generator, systems under test, reports and plots."""
