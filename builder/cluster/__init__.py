"""Clusters: services on nodes, the gateway in front of them, and running them (on one machine with --local)."""
