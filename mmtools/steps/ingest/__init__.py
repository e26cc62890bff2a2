"""`ingest`: media folders, listings (paths or URLs) and WebDataset tars into a dataset."""

from mmtools.steps.ingest.step import Ingest, IngestConfig, ListingSource

__all__ = ["Ingest", "IngestConfig", "ListingSource"]
