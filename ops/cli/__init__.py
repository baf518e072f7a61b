"""The `cdp` command line: a client of the platform, and the process supervisor of `cdp up`."""
