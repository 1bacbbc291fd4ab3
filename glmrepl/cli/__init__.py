"""Entry points: the glmrepl command and its subcommands (list, check, download, serve, quantize, demo)."""
