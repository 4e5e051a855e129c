"""Offline data preparation: sources from registry packages -> domains -> tokenized data."""
