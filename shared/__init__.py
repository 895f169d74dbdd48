"""fedpipe's domain library, shared by functions, workers and the local cloud.

Nothing here imports JAX: Cloud Functions load this package on every cold start.
"""
