"""I/O: one URI layer for local paths and s3://, Q1 discovery, catalog readers."""
