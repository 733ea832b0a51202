"""Adapters that route third-party models' attention through fastseq."""
