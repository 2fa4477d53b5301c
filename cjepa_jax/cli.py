"""The entry points' one error path: a bad flag, key, value or input is one line and exit 1.

Every CLI of the package (`cjepa-train`, `cjepa-probe`) runs its absl `main` through `run`:

  * flag parsing is wrapped: an unknown flag, a misspelled `--config.key` (with ml_collections'
    "did you mean") or a value of the wrong type prints `PROG: error: ...` on stderr and exits 1,
    instead of absl's usage dump or a 59-line traceback;
  * `--help` (`-h`, `--helpshort`, `--helpfull`) prints the entry point's docstring, its own flags
    and, when given, an extra text (the trainer lists every config key with its default and
    meaning, read from `config.py`), then exits 0;
  * inside `main`, a user error (`USER_ERRORS`: bad config values, missing data or checkpoints, a
    non-finite loss) prints `PROG: error: <message>` once and exits 1; anything else is a bug
    and keeps its traceback. With several processes the error goes through
    `distributed.fail_fast`, which shows it on every process.

`trainer_main` is the absl `main` both trainers share: flag checks, exit 75 on preemption, exit 0
for a run already complete, the JSON result line.

Nothing here runs at import.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
import jax

from cjepa_jax import distributed

# Errors whose message already names the problem and the fix: no traceback for these.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError,
               FloatingPointError, app.UsageError)
_HELP_FLAGS = ('-h', '-?', '--help', '--helpshort', '--helpfull', '--help=true')
_DID_YOU_MEAN = re.compile(r'Did you mean "([^"]+)" instead of "([^"]+)"\?')


class Exit(SystemExit):
  """Ends a run on purpose with an exit code and a message (e.g. 'already complete', preempted).

  `coordinated`: every process exits this way at the same point, so with several processes it is
  not reported to the others as a failure (see `distributed.fail_fast`).
  """

  coordinated = True

  def __init__(self, code: int, message: str = ''):
    super().__init__(code)
    self.message = message


def error_line(prog: str, error: BaseException | str) -> str:
  """`PROG: error: message`, the message made readable (ml_collections' key errors, quoting)."""
  text = str(error).strip()
  if isinstance(error, (AttributeError, KeyError)) or _DID_YOU_MEAN.search(text):
    text = text.replace('\\n', '\n').strip('\'"')
    m = _DID_YOU_MEAN.search(text)
    if m:
      text = (f'unknown config key {m.group(2)!r}: did you mean {m.group(1)!r}? '
              f'(--help lists every key)')
    else:
      text = f'unknown config key {text.splitlines()[0]!r} (--help lists every key)'
  if isinstance(error, flags.Error) and 'Unknown command line flag' in text:
    text += ' (--help lists the flags)'
  return f'{prog}: error: {text}'


def fail(prog: str, error: BaseException | str) -> None:
  """Prints the one-line error on stderr and exits 1."""
  print(error_line(prog, error), file=sys.stderr, flush=True)
  sys.exit(1)


def _help(prog: str, doc: str, module: str, extra_help: Callable[[], str] | None) -> str:
  parts = [doc.strip(), '', f'{prog} flags:', flags.FLAGS.module_help(module) or '  (none)',
           '', 'Multi-process flags:', flags.FLAGS.module_help(distributed.__name__)]
  if extra_help is not None:
    parts += ['', extra_help()]
  return '\n'.join(parts)


def _flags_parser(prog: str, doc: str, module: str, extra_help: Callable[[], str] | None
                  ) -> Callable[[list[str]], list[str]]:
  def parse(argv: list[str]) -> list[str]:
    if any(a in _HELP_FLAGS for a in argv[1:]):
      print(_help(prog, doc, module, extra_help))
      sys.exit(0)
    try:
      return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
      # flags.Error: unknown flag / bad value; AttributeError / KeyError: a misspelled
      # --config.key; ValueError / TypeError: a recipe that rejects its argument or a value.
      fail(prog, e)
    except FileNotFoundError as e:
      fail(prog, f'{e} (check the --config path)')
    return []  # Unreachable: fail() exits.
  return parse


def run(prog: str, main: Callable[[Sequence[str]], Any], *, doc: str, module: str,
        extra_help: Callable[[], str] | None = None) -> None:
  """`app.run(main)` with one-line errors, `--help`, and the multi-process start-up around it.

  Args:
    prog: the command's name for messages (`cjepa-train`).
    main: the absl main; user errors it raises become `prog: error: ...` and exit 1.
    doc: the help text's head (the entry module's docstring).
    module: the module whose flags `--help` lists (its `__name__`, or `sys.argv[0]` for
      `python -m`).
    extra_help: returns more help text (e.g. the config keys).
  """

  def wrapped(argv: Sequence[str]) -> Any:
    try:
      distributed.initialize()
    except ValueError as e:
      fail(prog, e)
    with distributed.fail_fast():
      try:
        return main(argv)
      except Exit as e:
        if e.message:
          print(f'{prog}: {e.message}', file=sys.stderr, flush=True)
        raise
      except USER_ERRORS as e:
        if jax.process_count() > 1:
          raise  # fail_fast shows it on every process and stops them all.
        fail(prog, e)

  distributed.define_flags()
  app.run(wrapped, flags_parser=_flags_parser(prog, doc, module, extra_help))


def trainer_main(argv: Sequence[str], config: Any, workdir: str | None,
                 train_fn: Callable[[Any, str], dict[str, Any]], *, example: str,
                 complete_hint: str = '') -> None:
  """The absl `main` of both trainers (`cjepa-train`, `cjepa-finetune`).

  Checks the flags, runs `train_fn(config, workdir)`, turns a preemption into exit code 75 and an
  already complete run into exit 0 with a line saying so (`complete_hint` appended), and prints
  the numeric entries of the result as one JSON line on process 0.
  """
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if config is None or workdir is None:
    raise app.UsageError(f'--config and --workdir are required, e.g. {example}')
  # pylint: disable=g-import-not-at-top  (after the flag checks: TensorFlow takes ~10 s)
  from cjepa_jax import input_pipeline
  from cjepa_jax import metrics
  from cjepa_jax import preemption
  from cjepa_jax import workdir as workdir_lib
  # pylint: enable=g-import-not-at-top
  metrics.quiet_library_logs()
  input_pipeline.hide_accelerators_from_tf()
  try:
    result = train_fn(config, workdir)
  except workdir_lib.Preempted as e:
    raise Exit(preemption.EXIT_CODE) from e
  if result.get('already_complete'):
    raise Exit(0, f'already complete at step {result["step"]} in {workdir}; nothing to do'
                  f'{complete_hint}.')
  if jax.process_index() == 0:
    print(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float))}))
