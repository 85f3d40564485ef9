"""The baseline defenses, one module each, each registering one `kdp.defenses.Defense`.
Importing this package registers them all: read `BASELINES` from here. A new baseline is a
new module here and one import line below (docs/extending.md)."""
from kdp.defenses import REGISTRY as BASELINES  # noqa: F401 (filled by the imports below)

import kdp.baselines.jpeg  # noqa: F401,E402 (each import registers one baseline)
import kdp.baselines.nrp  # noqa: F401,E402
import kdp.baselines.soap  # noqa: F401,E402
import kdp.baselines.bitdepth  # noqa: F401,E402
import kdp.baselines.at_classifier  # noqa: F401,E402
import kdp.baselines.e2e_at  # noqa: F401,E402
