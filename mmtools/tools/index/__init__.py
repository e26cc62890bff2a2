"""Nearest-neighbour indexes of embedding columns: build (`build`), what to build (`plan`),
the faiss work (`parts`), and queries and their hits (`hits`). The on-disk format and the
reader are in `mmtools.io.index`."""
