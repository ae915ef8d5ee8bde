"""Model registry data (installed as ``tinysr_cli._registry``)."""
