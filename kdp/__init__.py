"""kdp: distillation-based adversarial purification."""
__version__ = "0.1.0"

# every baseline defense registers itself on import (timm's way): whatever part of kdp a process
# imports first, kdp.defenses.REGISTRY is full before any module reads it
import kdp.baselines  # noqa: E402,F401
