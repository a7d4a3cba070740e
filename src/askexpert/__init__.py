"""askexpert: collaborative inference of Vision Transformers between an edge device and near-edge experts."""

__version__ = "0.1.0"
