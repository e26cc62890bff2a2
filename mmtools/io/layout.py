"""File names inside a dataset directory."""

MANIFEST = "_manifest.json"
RUN_FILE = "_run.json"
RETRY_FILE = "_retry.json"  # a retry generation in progress on a finished dataset
PROGRESS_DIR = "_progress"
REJECTS_DIR = "_rejects"
DROPPED_DIR = "_dropped"  # the drop ledger: one row per row a step dropped by a named rule
LOCK_FILE = "_lock"
CACHE_DIR = "_cache"  # step caches (e.g. rewrite's per-row cache) that outlive a run
TMP_PREFIX = ".tmp-"
EXPORT_MANIFEST = "_export.json"  # an export directory's last file (`mmtools export`)


def shard_name(index: int) -> str:
    """Deterministic name of data shard `index`, so a retry overwrites its own work."""
    return f"part-{index:05d}.parquet"


def rejects_name(index: int) -> str:
    """Name of the reject shard committed with data shard `index`."""
    return f"{REJECTS_DIR}/part-{index:05d}.parquet"


def dropped_name(index: int) -> str:
    """Name of the ledger shard committed with data shard `index`."""
    return f"{DROPPED_DIR}/part-{index:05d}.parquet"
