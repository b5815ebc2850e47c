"""The API's routers, one per resource; ``deps`` holds what they share (``api.create_app``
assembles them)."""
