"""The director: the endpoint picker's one entry point, shared by every data plane.

A data plane (built-in proxy, Envoy ext_proc) hands the director the request's path, headers and body;
the director parses it, resolves model rewrite and objective, passes flow control, runs the scheduler and
returns a `Decision`. The data plane then sends the request to `decision.target` (falling back to
`decision.fallbacks()` on connection failure before any byte reached the client), reports the response
through `on_first_token` / `on_usage`, and calls `finish` exactly once (also on errors and disconnects).

Interface contract (implementation filled in by the gateway core):

    decision = await director.handle(path, headers, raw_body)      # raises GatewayError (4xx/5xx)
    decision.target          -> Endpoint                            # where to send
    decision.upstream_body   -> bytes                               # raw body, or rewritten if the model changed
    decision.request         -> InferenceRequest
    director.retarget(decision) -> Endpoint | None                  # next fallback after a connect failure
    director.on_first_token(decision)                               # TTFT bookkeeping
    director.finish(decision, info: ResponseInfo)                   # idempotent; releases in-flight once
"""
