"""Kubernetes integration: Service/EndpointSlice translation and list-then-watch discovery.

:mod:`l4lb.k8s.translate` is pure (dicts in, frozen dataclasses out);
:mod:`l4lb.k8s.client` is the only module that talks to the official ``kubernetes`` client;
:mod:`l4lb.k8s.watcher` keeps the latest objects per resource and signals changes.
"""
