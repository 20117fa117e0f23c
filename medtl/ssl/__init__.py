"""Self-supervised objectives built from lightly's losses and heads."""

from medtl.ssl.simclr import SimCLR

SSL_METHODS = {"simclr": SimCLR}

__all__ = ["SSL_METHODS", "SimCLR"]
