"""The target side of a migration: its core, sessions, journal, gate, service."""
