"""Response stages: what follows a forwarded request back to the client (usage, canaries)."""
