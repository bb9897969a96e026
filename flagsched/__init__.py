"""flagsched: applies scheduled feature-flag changes stored in PostgreSQL."""

__version__ = "0.1.0"
