"""The one place fedrad uses Flower's and Opacus' private or internal APIs (version-checked at import)."""

__all__ = ["flower", "opacus", "version"]
