"""``python -m graphsurgeon ...``: the command line (also what ``torchrun -m graphsurgeon`` runs)."""
import sys

from .cli import main

sys.exit(main())
