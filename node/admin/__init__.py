"""What an operator sees and changes, one service behind both the CLI and the HTTP API:
the node's status report (`report`)."""
