"""kdp: distillation-based adversarial purification."""
__version__ = "0.1.0"
