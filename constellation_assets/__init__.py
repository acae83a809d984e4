"""Constellation: Euclid weak-lensing shear catalog and reproducible lens-injection simulations."""

__version__ = "0.1.0"
