"""The `sorna` command line: one module per command group, thin over sorna_server."""
