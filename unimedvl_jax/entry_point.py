"""The shared start of every command line: absl flags per command, one --help, and the process set-up.

Every console script (pyproject `[project.scripts]`) is a `Command`: its program name, its help text (usage
examples first), a function that defines its absl flags on a `FlagValues` of its own, the flags it requires and,
for the trainers and the demo, an ml_collections `--config` file flag (`--config file.py --config.a.b=value`).
`Command.run(body, argv)` parses the command line, answers `-h` / `--help` / `--helpfull` (exit status 0) and
calls `body(args)` with the parsed values (a flag `--data-dir` is `args.data_dir`). A bad command line prints ONE
line, `prog: error: ... (see 'prog --help')`, and exits with status 2. So does bad input found while the command
runs (unimedvl_jax/errors.py: a missing, unreadable, truncated or corrupt file, invalid JSON, a tensor of the wrong
shape): `prog: error: <message naming the file / key / record>`, exit status 2, no traceback. `--debug` (a flag of
every command) shows the traceback of such an error instead; any other exception (a bug) always shows it. A body
that uses JAX calls `start(prog)` before any JAX computation: quiet library logging, spawned data workers that skip
re-running the main module, join the multi-process job the environment describes (a no-op for one process; a failed
join exits 3), flax's explicit-sharding mode.

Why not absl's global FLAGS and `app.run`: absl's --help lists the key flags of the main module, and a console
script's wrapper is the main module, so `unimedvl-train --help` showed no flag and exited 1; cli.py and
inference_cli.py hold three commands each whose flags share names (`--out`, `--checkpoint`) with different
meanings and requirements, which one global registry cannot hold; tests call several commands in one process.
The flags of the global registry (absl logging, grain) are still accepted by every command and listed by
--helpfull. Importing this module initialises no JAX backend.
"""

from __future__ import annotations

import dataclasses
import importlib.machinery
import inspect
import logging
import os
import sys
import textwrap
import types
from collections.abc import Callable, Sequence

from absl import flags
from flax import nnx
from ml_collections import config_flags

from unimedvl_jax import distributed
from unimedvl_jax.errors import UserError, describe, is_user_error

__all__ = ["USAGE_EXIT", "Command", "ConfigFile", "UsageError", "UserError", "start"]

USAGE_EXIT = 2  # a bad command line (as argparse / getopt programs), or bad input (errors.UserError)
_WIDTH = 100
_NOT_LIBRARY = ("absl.app",)  # app.run's own flags (pdb, profiling, its help): no command runs under app.run
_DEBUG_HELP = ("show the Python traceback of an error in the input (a missing or corrupt file, invalid JSON, ...) "
               "instead of the one `error:` line")


class UsageError(Exception):
    """A bad command line found after parsing (e.g. a bad combination of flags): `prog: error: ...`, status 2."""


@dataclasses.dataclass(frozen=True)
class ConfigFile:
    """A command's `--config` flag: an ml_collections config file whose fields are overridden on the command line
    (`--config.section.key=value`, after --config; config_flags.DEFINE_config_file)."""

    default: str | None = None
    help: str = "experiment config file (e.g. configs/tiny.py)"
    lock: bool = True  # no new fields (a misspelt override is an error)
    example: str = "--config.train.batch_packs=4"  # shown by --help


@dataclasses.dataclass(frozen=True)
class Command:
    """One command line. `define(fv)` defines the command's own flags with `flag_values=fv`; `required` names
    the flags that must be given; `doc` is the help text (cleaned with inspect.cleandoc)."""

    prog: str
    doc: str
    define: Callable[[flags.FlagValues], None]
    required: tuple[str, ...] = ()
    config: ConfigFile | None = None

    def extended(self, define: Callable[[flags.FlagValues], None], *, doc: str | None = None) -> Command:
        """The same command with more flags (e.g. tests/train/hooked_train.py's test hooks)."""

        def both(fv):
            self.define(fv)
            define(fv)

        return dataclasses.replace(self, define=both, doc=self.doc if doc is None else doc)

    def own_flags(self) -> list[flags.Flag]:
        """The command's flags in definition order (--config first): what --help lists."""
        return self._flag_values([self.prog])[1]

    def help_text(self, own: Sequence[flags.Flag] | None = None, *, full: bool = False) -> str:
        """--help: a usage line, the doc (usage examples), every own flag with its description, the --config
        override syntax; --helpfull adds the library flags of absl's global registry."""
        own = self.own_flags() if own is None else own
        needed = " ".join(f"--{name}={name.upper().replace('-', '_')}" for name in self.required)
        lines = [f"usage: {self.prog} {needed + ' ' if needed else ''}[flags]", "", inspect.cleandoc(self.doc), "",
                 "Flags (--flag=value or --flag value):"]
        lines += [_describe(flag, required=flag.name in self.required) for flag in own]
        if self.config is not None:
            lines += ["", textwrap.fill(
                "Config overrides: after --config, any field of the config file is set with "
                f"--config.section.key=value (repeatable; values are Python literals), e.g. {self.config.example}",
                _WIDTH, break_on_hyphens=False, break_long_words=False)]
        lines += ["", "  -h, --help: show this help and exit",
                  f"  --[no]debug: {_DEBUG_HELP}",
                  "  --helpfull: this help and the library flags (absl logging, grain) every command accepts",
                  "  --flagfile=FILE: read more flags from FILE, one per line"]
        if full:
            lines += ["", "Library flags:"] + [flags.FLAGS.module_help(module) for module in sorted(_library())]
        return "\n".join(lines) + "\n"

    def parse(self, argv: Sequence[str] | None = None) -> types.SimpleNamespace:
        """Parse `argv` (the arguments after the program name; default sys.argv[1:]) into a namespace of the own
        flags' values. Raises flags.Error / UsageError for a bad command line; exits 0 after --help."""
        return self._parse(argv)[0]

    def _parse(self, argv: Sequence[str] | None) -> tuple[types.SimpleNamespace, flags.FlagValues]:
        """parse(), and the registry it parsed (for --debug)."""
        argv = [self.prog, *(sys.argv[1:] if argv is None else argv)]
        fv, own = self._flag_values(argv)
        try:
            rest = fv(argv)
        except (AttributeError, KeyError) as e:  # ml_collections: an override of a field the config lacks
            if self.config is None:
                raise
            raise UsageError(f"a --config.* override names no field of the config: {e.args[0] if e.args else e}") from e
        if len(rest) > 1:
            raise UsageError(f"unexpected arguments: {rest[1:]}")
        if not flags.FLAGS.is_parsed():  # library flags (grain reads its own) were parsed through fv above
            flags.FLAGS.mark_as_parsed()
        args = types.SimpleNamespace(**{flag.name.replace("-", "_"): flag.value for flag in own})
        if self.config is not None and args.config is not None:
            try:  # ml_collections defers a config file's load error to the config's first use
                args.config.get("name")
            except OSError as e:
                path = getattr(fv["config"], "config_filename", None)
                if path and not os.path.isfile(path.partition(":")[0]):
                    raise UsageError(f"--config {path}: no such file") from e
                raise UsageError(f"--config: {e}") from e
        return args, fv

    def run(self, body: Callable[[types.SimpleNamespace], int | None], argv: Sequence[str] | None = None) -> int:
        """Parse the command line and run `body(args)`; returns its exit status (None -> 0).

        A bad command line (flags.Error, UsageError) and bad input (errors.is_user_error: a missing or corrupt
        file, invalid JSON, ...) print ONE line `prog: error: ...` to stderr and exit with status 2 (SystemExit);
        with --debug bad input raises (a traceback). Any other exception propagates (a bug: its traceback)."""
        fv = None
        try:
            args, fv = self._parse(argv)
            status = body(args)
        except (flags.Error, UsageError) as e:
            self._error(f"{describe(e)} (see '{self.prog} --help')")
        except Exception as e:
            if not is_user_error(e) or (fv is not None and fv["debug"].value):
                raise
            self._error(describe(e))
        return 0 if status is None else status

    def _error(self, message: str):
        print(f"{self.prog}: error: {message}", file=sys.stderr, flush=True)
        sys.exit(USAGE_EXIT)

    def _flag_values(self, argv: list[str]) -> tuple[flags.FlagValues, list[flags.Flag]]:
        """A fresh registry: the own flags, the help flags, then the global registry's library flags."""
        fv = flags.FlagValues()
        fv.set_gnu_getopt(True)  # flags after a stray argument are still parsed (the stray one is reported)
        if self.config is not None:  # ml_collections finds the --config.* overrides in sys_argv
            config_flags.DEFINE_config_file("config", self.config.default, self.config.help, flag_values=fv,
                                            lock_config=self.config.lock, sys_argv=argv)
        self.define(fv)
        own = _distinct(fv)
        if self.required:
            flags.mark_flags_as_required(list(self.required), flag_values=fv)
        flags.DEFINE_bool("debug", False, _DEBUG_HELP, flag_values=fv)
        flags.DEFINE_flag(_HelpFlag(self, own, full=False), fv)
        flags.DEFINE_flag(_HelpFlag(self, own, full=True), fv)
        for flag in (flag for module_flags in _library().values() for flag in module_flags):
            if flag.name not in fv and (flag.short_name is None or flag.short_name not in fv):
                fv[flag.name] = flag  # the same Flag object: parsing sets the global registry's value too
        return fv, own


class _HelpFlag(flags.BooleanFlag):
    """-h / --help and --helpfull: print the command's help and exit 0 while parsing (before required flags are
    checked), as absl's own help flag does (which exits 1 and shows the main module's flags)."""

    def __init__(self, command: Command, own: list[flags.Flag], *, full: bool):
        super().__init__("helpfull" if full else "help", False, "show the help and exit",
                         short_name=None if full else "h")
        self._command, self._own, self._full = command, own, full

    def parse(self, argument):
        if self._parse(argument):
            sys.stdout.write(self._command.help_text(self._own, full=self._full))
            sys.stdout.flush()
            sys.exit(0)


def _library() -> dict[str, list[flags.Flag]]:
    """{module: flags} of absl's global registry that every command accepts (absl logging, grain, ...)."""
    return {m: f for m, f in flags.FLAGS.flags_by_module_dict().items() if m not in _NOT_LIBRARY}


def _distinct(fv: flags.FlagValues) -> list[flags.Flag]:
    """The flags of a registry in definition order, each once (a short name is a second key of its flag)."""
    return [fv[name] for name in fv if fv[name].name == name]


def _describe(flag: flags.Flag, *, required: bool) -> str:
    """One flag of --help: `--name: description (default: ...)`, wrapped."""
    name = f"--[no]{flag.name}" if flag.boolean else f"--{flag.name}"
    if flag.short_name:
        name = f"-{flag.short_name}, {name}"
    text = " ".join(flag.help.split())  # a multi flag's help says "repeat this option ..." (absl)
    if required:
        text += " (required)"
    elif not (flag.default is None or flag.default is False or flag.default in ([], ())):
        default = ",".join(map(str, flag.default)) if isinstance(flag, flags.MultiFlag) else flag.default_as_str
        text += f" (default: {default})"
    return textwrap.fill(f"{name}: {text}", _WIDTH, initial_indent="  ", subsequent_indent="      ",
                         break_on_hyphens=False, break_long_words=False)


def spawn_without_main() -> None:
    """Let processes this one spawns (grain's data workers) start without running this program's main module."""
    # multiprocessing's "spawn" start runs the parent's __main__ again in every child, so that objects pickled by
    # reference to it resolve there. A console script's __main__ imports its whole command (about 4 s on a 2-core
    # machine, while a data worker needs 1–2 s of imports), and every curriculum stage starts new workers. grain sends
    # a worker its dataset with cloudpickle, which pickles __main__'s own objects by value, so the workers need no
    # __main__. A main module whose spec is named "__main__" is one multiprocessing never re-runs (as for
    # `python -m package`); a main already marked so is left as it is.
    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None) or ""
    if main is not None and name != "__main__" and not name.endswith(".__main__"):
        main.__spec__ = importlib.machinery.ModuleSpec("__main__", None)


def start(prog: str, *, timeout_s: float | None = None) -> distributed.ClusterSpec:
    """Prepare this process for `prog` before any JAX computation or device query; returns the ClusterSpec."""
    logging.getLogger().setLevel(logging.WARNING)
    spawn_without_main()
    spec = distributed.initialize_or_exit(prog, timeout_s=timeout_s)
    nnx.use_eager_sharding(False)  # variables are placed by sharding.shard_model / their checkpoints
    return spec
