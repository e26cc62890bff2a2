"""Dataset input and output shared by every command."""
