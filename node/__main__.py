"""`python -m node` runs the `ainode` command line."""

from node.cli import app

app()
