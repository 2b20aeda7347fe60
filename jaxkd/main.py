"""Entry point: `python -m jaxkd.main --config=configs/<file>.py[:arg] --workdir=<dir>`.

Exit codes, so a scheduler can tell what to do next:
  0   finished.
  1   an unexpected crash (with a traceback).
  2   a bad command line, config, checkpoint, teacher export, dataset or workdir (a misspelt
      --config.<field>, a value out of range, jaxkd.errors.JaxkdError), printed as
      "error: ..." without a traceback; fix the input before rerunning.
  3   the training loss or gradient became non-finite (NonFiniteLossError); the message names
      the step and the last good checkpoint, which never holds the diverged state.
  75  preempted (EX_TEMPFAIL): SIGTERM or SIGINT stopped the run after the current step and a
      checkpoint at that step; rerun the same command to continue. A second signal stops the
      run at once.
"""

import difflib
import logging
import re
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config(arg)).",
                                         lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, exports.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
    """absl's flag parsing, with every failure (a misspelt --config.<field>, a value of the
    wrong type, a config file that does not load) one `error:` line and exit status 2."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # absl and ml_collections raise many kinds here
        print(f"error: {_flag_error_message(argv, e)}", file=sys.stderr)
        sys.exit(2)


def _flag_error_message(argv, error) -> str:
    from jaxkd import run_config

    known = run_config.known_field_paths()
    for arg in argv[1:]:
        match = re.match(r"--config\.([\w.]+)", arg)
        if match and match.group(1) not in known and not _under_free_section(match.group(1)):
            close = difflib.get_close_matches(match.group(1), known, n=1)
            hint = f" (did you mean --config.{close[0]}?)" if close else ""
            return f"unknown config field --config.{match.group(1)}{hint}"
    cause = error.__cause__ or error
    if isinstance(cause, (AttributeError, KeyError)):  # a known field this config lacks
        missing = str(cause).strip("\"'")
        return (f"this config has no field {missing!r} to override (a suite config sets "
                "fields per run: --config.runs.<name>.<field>)")
    return f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__


def _under_free_section(path: str) -> bool:
    """Model overrides and suite runs hold fields base_config cannot list."""
    return path.split(".")[0] in ("runs",) or ".overrides." in f".{path}"


def main(argv):
    del argv
    from jaxkd import runner
    from jaxkd.errors import JaxkdError

    # jaxkd's own progress at INFO; the libraries' chatter (TFDS, Orbax) only when it matters.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("jaxkd").setLevel(logging.INFO)
    try:
        config = _CONFIG.value
        config.keys()  # a config file that failed to load raises here
    except Exception as e:  # noqa: BLE001  (any failure of the user's config file)
        print(f"error: cannot load --config: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        runner.run(config, _WORKDIR.value)
    except JaxkdError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
