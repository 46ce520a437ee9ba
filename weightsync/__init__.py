"""Code both sides of weightsync share: wire format, manifests, errors and the generated stubs."""

__all__ = ["__version__"]

__version__ = "0.1.0"
