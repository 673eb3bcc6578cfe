"""The admin REST API (aiohttp)."""
