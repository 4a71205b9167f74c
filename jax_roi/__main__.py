import sys

from jax_roi.tools.cli import main

sys.exit(main())
