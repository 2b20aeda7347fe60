"""Entry point: `python -m jaxkd.main --config=configs/<file>.py[:arg] --workdir=<dir>`.

Exit codes, so a scheduler can tell what to do next:
  0   finished.
  1   the command line or config file did not parse (absl's "FATAL Flags parsing error", e.g. a
      misspelt --config.<field>), or an unexpected crash (with a traceback).
  2   a bad config, checkpoint, teacher export, dataset or workdir (jaxkd.errors.JaxkdError),
      printed as "error: ..." without a traceback; fix the input before rerunning.
  3   the training loss or gradient became non-finite (NonFiniteLossError); the message names
      the step and the last good checkpoint, which never holds the diverged state.
  75  preempted (EX_TEMPFAIL): SIGTERM or SIGINT stopped the run after the current step and a
      checkpoint at that step; rerun the same command to continue. A second signal stops the
      run at once.
"""

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config(arg)).",
                                         lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, exports.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from jaxkd import runner
    from jaxkd.errors import JaxkdError

    # jaxkd's own progress at INFO; the libraries' chatter (TFDS, Orbax) only when it matters.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("jaxkd").setLevel(logging.INFO)
    try:
        runner.run(_CONFIG.value, _WORKDIR.value)
    except JaxkdError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    app.run(main)
