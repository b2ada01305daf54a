"""ingate: a Kubernetes-native inference gateway for LLM serving."""

__version__ = "0.1.0"
