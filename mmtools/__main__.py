"""`python -m mmtools`."""

from mmtools.cli import main

if __name__ == "__main__":
    main()
