"""The steps: each a plain class over a stream of Arrow record batches, usable without the CLI."""
