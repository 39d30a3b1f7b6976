"""The HTTP edge shared by the manager and the agent servers: request guard, admission, strict bodies."""
