import sys

from jax_roi.cli import main

sys.exit(main())
