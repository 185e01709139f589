"""The target side: its core and parts (admission, history, journal, gate), services."""
