"""The entry points' one error path: a bad flag, key, value or input is one line and exit 1.

Every CLI of the package (`cjepa-train`, `cjepa-probe`) runs its absl `main` through `run`:

  * flag parsing is wrapped: an unknown flag, a misspelled `--config.key` (with ml_collections'
    "did you mean") or a value of the wrong type prints `PROG: error: ...` on stderr and exits 1,
    instead of absl's usage dump or a 59-line traceback; so does a `--config` file that is
    missing, unreadable or not valid Python (naming the file, and the line of a syntax error),
    and an argument its recipe does not take (`configs/x.py:nope`: the recipe's own message,
    which lists its arguments, without ml_collections' traceback);
  * config keys that were renamed (`config.RENAMED_*`, passed as `renamed`) are rewritten to their
    new names before parsing, each with a one-line warning, for one release;
  * `--help` (`-h`, `--helpshort`, `--helpfull`) prints the entry point's docstring, its own flags
    and, when given, an extra text (the trainer lists every config key with its default and
    meaning, read from `config.py`), then exits 0;
  * inside `main`, a user error (`USER_ERRORS`: bad config values, missing data or checkpoints, a
    non-finite loss) prints `PROG: error: <message>` once and exits 1; anything else is a bug
    and keeps its traceback. With several processes the error goes through
    `distributed.fail_fast`, which shows it on every process.

`trainer_main` is the absl `main` both trainers share: flag checks, a workdir held by another
live trainer refused at once (`workdir_lock.check_free`, before the slow imports), library
tracebacks sent to `WORKDIR/errors.log` (`errorlog`; the error line names the file), exit 75 on
preemption, exit 0 for a run already complete, the JSON result line.

Nothing here runs at import.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any, Callable, Mapping, Sequence

from absl import app
from absl import flags
import jax

from cjepa_jax import config as config_lib
from cjepa_jax import cpu_flags
from cjepa_jax import distributed
from cjepa_jax import errorlog
from cjepa_jax import workdir_lock

# Errors whose message already names the problem and the fix: no traceback for these.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError,
               FloatingPointError, app.UsageError, workdir_lock.WorkdirLockLostError)
_HELP_FLAGS = ('-h', '-?', '--help', '--helpshort', '--helpfull', '--help=true')
_DID_YOU_MEAN = re.compile(r'Did you mean "([^"]+)" instead of "([^"]+)"\?')
_RECIPE_ERROR = 'Error whilst parsing config file:'  # ml_collections' wrapping of get_config's.


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
  if _RECIPE_ERROR in text:
    text = _recipe_error(text)
  return f'{prog}: error: {text}'


def _recipe_error(text: str) -> str:
  """`--config=PATH:ARG: <the recipe's own message>` from ml_collections' traceback dump.

  A recipe that rejects its argument says which it takes (configs/*.py raise a ValueError naming
  them); one that takes none fails with Python's TypeError, said here in words.
  """
  flag = text.split(f': {_RECIPE_ERROR}')[0].removeprefix('flag ')
  last = [line for line in text.splitlines() if line.strip()][-1].strip()
  kind, _, message = last.partition(': ')
  if kind == 'TypeError' and 'get_config()' in message and 'positional argument' in message:
    message = (f'{message}: this recipe takes no argument after ":" (or a different number; see '
               'the docstring of its file)')
  return f'{flag}: {message}'


def _config_file(argv: Sequence[str]) -> str | None:
  """The path given to `--config` (without its `:arg`), or None."""
  for i, arg in enumerate(argv):
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1].split(':', 1)[0]
    if arg.startswith('--config='):
      return arg.split('=', 1)[1].split(':', 1)[0]
  return None


def check_config_file(path: str) -> None:
  """Raises ValueError (one line) unless `path` is a readable file of valid Python.

  ml_collections would defer a missing file's error to the first use of the config and let a
  syntax error escape as a 58-line traceback.
  """
  if not os.path.exists(path):
    folder = os.path.dirname(path) or '.'
    recipes = (sorted(f for f in os.listdir(folder) if f.endswith('.py'))
               if os.path.isdir(folder) else [])
    hint = f' ({folder}/ has {", ".join(recipes)})' if recipes else ''
    raise ValueError(f'--config {path}: no such file{hint}; check the --config path.')
  try:
    with open(path, 'rb') as f:
      source = f.read()
  except OSError as e:
    raise ValueError(f'--config {path} cannot be read: {e.strerror or e}; check the --config '
                     'path and its permissions.') from None
  try:
    compile(source, path, 'exec')
  except SyntaxError as e:
    where = f'line {e.lineno}' + (f', column {e.offset}' if e.offset else '')
    code = f': {e.text.strip()!r}' if e.text and e.text.strip() else ''
    raise ValueError(f'--config {path} is not valid Python: {e.msg} at {where}{code}; fix the '
                     'recipe file.') from None


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


def rename_flags(prog: str, argv: Sequence[str], renamed: Mapping[str, tuple[str, ...]]
                 ) -> list[str]:
  """`argv` with every renamed `--config.OLD[=V]` replaced by the new key(s), each with a one-line
  warning on stderr naming the new key (`config.RENAMED_*`: the old names work for one release)."""
  out = [argv[0]] if argv else []
  i = 1
  while i < len(argv):
    arg = argv[i]
    i += 1
    if not arg.startswith('--config.'):
      out.append(arg)
      continue
    key, eq, value = arg[len('--config.'):].partition('=')
    new = config_lib.renamed_key(key, dict(renamed))
    if new is None:
      out.append(arg)
      continue
    if not eq and i < len(argv):   # `--config.key value`
      value, i = argv[i], i + 1
    print(f'{prog}: warning: --config.{key} is deprecated and goes in the next release; use '
          f'{" and ".join(f"--config.{n}" for n in new)}.', file=sys.stderr, flush=True)
    out.extend(f'--config.{n}={value}' for n in new)
  return out


def _flags_parser(prog: str, doc: str, module: str, extra_help: Callable[[], str] | None,
                  renamed: Mapping[str, tuple[str, ...]]
                  ) -> Callable[[list[str]], list[str]]:
  def parse(argv: list[str]) -> list[str]:
    renamed_argv = rename_flags(prog, argv, renamed)
    if renamed_argv != list(argv) and list(argv) == sys.argv:
      # ml_collections reads `--config.*` overrides from sys.argv itself, not from the argv
      # given to the parser: the rewritten flags must be there too.
      sys.argv[:] = renamed_argv
    argv = renamed_argv
    if any(a in _HELP_FLAGS for a in argv[1:]):
      print(_help(prog, doc, module, extra_help))
      sys.exit(0)
    config_file = _config_file(argv[1:])
    if config_file is not None:
      try:
        check_config_file(config_file)
      except ValueError as e:
        fail(prog, e)
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
        extra_help: Callable[[], str] | None = None,
        renamed: Mapping[str, tuple[str, ...]] | None = None) -> None:
  """`app.run(main)` with one-line errors, `--help`, and the multi-process start-up around it.

  Args:
    prog: the command's name for messages (`cjepa-train`).
    main: the absl main; user errors it raises become `prog: error: ...` and exit 1.
    doc: the help text's head (the entry module's docstring).
    module: the module whose flags `--help` lists (its `__name__`, or `sys.argv[0]` for
      `python -m`).
    extra_help: returns more help text (e.g. the config keys).
    renamed: old config keys -> their new keys (`config.RENAMED_*`), rewritten with a warning.
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
        details = errorlog.diverted_to()
        # The library tracebacks behind this error were kept off the console: say where they are.
        fail(prog, f'{str(e).strip()} (library tracebacks: {details})' if details else e)

  cpu_flags.apply()  # Before anything starts the backend (XLA reads XLA_FLAGS once).
  distributed.define_flags()
  app.run(wrapped, flags_parser=_flags_parser(prog, doc, module, extra_help, renamed or {}))


def run_plain(prog: str, main: Callable[[], Any]) -> Any:
  """The entry point of an argparse command (the converters, the export): a user error in
  `main()` prints `PROG: error: ...` and exits 1; anything else keeps its traceback."""
  try:
    return main()
  except USER_ERRORS as e:
    fail(prog, e)


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
  if jax.process_index() == 0:
    # A second trainer on a workdir stops here, in seconds, before TensorFlow is imported.
    workdir_lock.check_free(workdir, force=bool(config.get('force_unlock', False)))
  errorlog.divert_library_errors(workdir)
  # pylint: disable=g-import-not-at-top  (after the flag checks: TensorFlow takes ~10 s)
  from cjepa_jax import metrics
  from cjepa_jax import preemption
  from cjepa_jax.data import lazy_tf
  # pylint: enable=g-import-not-at-top
  metrics.quiet_library_logs()
  lazy_tf.hide_accelerators_from_tf()
  try:
    result = train_fn(config, workdir)
  except preemption.Preempted as e:
    raise Exit(preemption.EXIT_CODE) from e
  if result.get('already_complete'):
    raise Exit(0, f'already complete at step {result["step"]} in {workdir}; nothing to do'
                  f'{complete_hint}.')
  if jax.process_index() == 0:
    print(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float))}))
