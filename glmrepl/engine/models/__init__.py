"""Checkpoint folders and the loaded model: validation, the catalog, download, loading, adapters, quantizing, the manager."""
