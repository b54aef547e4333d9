"""Bridges from other libraries into a corral stack (the openai SDK through httpx/httpx2)."""
