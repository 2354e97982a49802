"""The hospital side of fedrad: data ingest and cache, DP training, evaluation, ClientApp, fl-client."""
