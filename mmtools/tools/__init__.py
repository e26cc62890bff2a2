"""Tools over whole datasets that are not steps: stats, export, info, previews."""
