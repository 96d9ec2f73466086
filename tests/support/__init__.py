"""Shared test drivers and guests: imported by unit and system tests, holds no tests itself."""
