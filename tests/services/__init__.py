"""Services the tests start and stop by PID (PostgreSQL, an OpenID provider)."""
