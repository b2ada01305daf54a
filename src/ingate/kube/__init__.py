"""Kubernetes adapter: InferencePool/InferenceObjective/InferenceModelRewrite models, the controller
that feeds the datastore and the objective store from the API server, Lease leader election, and an
in-process fake API server for tests. The core never imports this package."""
