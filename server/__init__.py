"""The coordinator side of fedrad: ServerApp, strategy, checkpoints, run report, fl-server."""
