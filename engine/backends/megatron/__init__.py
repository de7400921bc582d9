"""Megatron-core train backend (backend.py: ``MegatronBackend``) and its weight layouts (convert.py).

Importing the package imports no megatron-core: the backend imports it in ``setup``.
"""
