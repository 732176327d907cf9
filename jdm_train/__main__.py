"""`python -m jdm_train ...` is the `jdm-train` command (see `jdm_train.cli`)."""

import sys

from jdm_train.cli import main

if __name__ == "__main__":
    sys.exit(main())
