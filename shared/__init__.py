"""Code shared by every CDP service: message types, subject names, the actor runtime,
SQLite helpers, configuration and logging. Services import only from here, never from
each other."""

__version__ = "0.1.0"
