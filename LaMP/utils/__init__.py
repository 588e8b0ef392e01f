"""Shared helpers: the task registry, data loading, metrics, prompts and models.

Kept free of heavy imports: torch and transformers load only in the modules that need them.
"""
