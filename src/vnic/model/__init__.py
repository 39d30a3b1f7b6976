"""The pure domain model: units, profiles, sessions, resolution. No I/O."""
