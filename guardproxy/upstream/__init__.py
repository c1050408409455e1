"""Forwarding to the model API: the transport side of the proxy."""

from guardproxy.upstream.forward import UpstreamApp

__all__ = ["UpstreamApp"]
