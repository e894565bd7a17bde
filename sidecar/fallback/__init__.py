"""Fallback replies: the last good answer per call, and static answers from the config."""
