"""The web console (`cdp console`): pages over the admin API, served by aiohttp."""
