"""Routing: YAML rules (rules.py) and their evaluation against series (engine.py)."""
