"""The HTTP API gateway: app factory, middlewares, routes and the PTY bridge.

`create_app(config)` in `app.py` builds the one aiohttp application that both
`sorna serve` and the tests run.
"""
