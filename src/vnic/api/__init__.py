"""The manager's HTTP API: routers, schemas, dependencies."""
