"""Edge features as ASGI middleware: auth, rate limits, cache, CORS, shaping, BFF, observability."""
