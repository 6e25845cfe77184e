"""The transcoding core: descriptors, HttpRule, routing, JSON, errors, the ASGI app."""
