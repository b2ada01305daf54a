"""Async inference on idle capacity: a processor that drains a durable queue into the gateway as
sheddable traffic and writes one result per request id (llm-d-async compatible messages)."""
