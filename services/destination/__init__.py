"""Destination: activates audiences and profile attributes to external systems."""
