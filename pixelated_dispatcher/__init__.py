"""pixelated-dispatcher: one HTTPS login in front of many single-user web agents."""

__version__ = "0.1.0"
