"""Macro benchmarks of l4lb against a direct connection and other TCP proxies."""
