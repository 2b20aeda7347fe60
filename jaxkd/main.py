"""Entry point: `python -m jaxkd.main --config=configs/<file>.py[:arg] --workdir=<dir>`."""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config(arg)).",
                                         lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, exports.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from jaxkd import runner
    from jaxkd.errors import JaxkdError

    logging.getLogger().setLevel(logging.INFO)
    try:
        runner.run(_CONFIG.value, _WORKDIR.value)
    except JaxkdError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
