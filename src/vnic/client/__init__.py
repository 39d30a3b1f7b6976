"""Clients of the manager's HTTP API."""
