"""The operator console: server-rendered pages on the admin listener (docs/contract.md §16)."""
