"""``python -m carlreg``: the command line (registration, training, the demo)."""
import sys

from .cli import COMMANDS, main
from .demo import demo_main
from .train_cli import train_main

sys.exit(main(commands={
    **COMMANDS,
    "train": (train_main, "train a CARL network from a config (carl-train)"),
    "demo": (demo_main, "register the demo pair and say where the results are (carl-demo)"),
}, prog="python -m carlreg"))
