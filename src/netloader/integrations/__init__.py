"""Integrations of netloader into serving engines; each module imports its engine only when used."""
