"""``python -m tiedlora.prepare_data task=<name> ...`` (see the package docstring)."""

from tiedlora.cli import run
from tiedlora.prepare_data import main

run(main)
