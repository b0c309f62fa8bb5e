"""What an operator sees and changes, one service behind both the CLI and the HTTP API: the
actions on the node's work (`actions`: retry, cancel, resend, route again, queue a fetch) and
the status report (`report`). Routing rules have theirs in `node.flow.routing.admin`."""
