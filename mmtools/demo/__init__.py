"""The demo: a generated sample with planted noise, the whole chain on it, and a report."""
