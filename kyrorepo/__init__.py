"""kyrorepo: content-addressed, deduplicating, encrypted backups for database data directories."""

__version__ = "0.1.0"
