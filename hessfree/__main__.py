"""``python -m hessfree run CONFIG.yaml ...``: the same as the ``hessfree`` command."""

import sys

from hessfree.train.cli import main

sys.exit(main())
