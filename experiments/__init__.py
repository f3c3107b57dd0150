"""Reproducible studies (command, table, plot), each in its own folder; not part of the installed package."""
