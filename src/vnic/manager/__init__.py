"""The session manager: the service layer now; the REST API arrives with the service issue."""
