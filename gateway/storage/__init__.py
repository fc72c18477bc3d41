"""Everything that speaks Redis: the key schema, the clients, policy storage, the audit stream and the Lua scripts."""
