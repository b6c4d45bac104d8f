"""Persistent interactive shells that run one cell at a time, as NeMo-Skills' sandbox does.

Standard library only (runs inside the sandboxed interpreter). Two backends:

- ``IPythonShell``: IPython's ``TerminalInteractiveShell`` (or the core ``InteractiveShell``) with
  stdout/stderr captured around ``run_cell`` — what NeMo-Skills runs, so the output (pretty-printed last
  expression, Plain tracebacks) is exactly what OpenMath models were trained on.
- ``BuiltinShell``: used when IPython is not installed in the sandbox's Python. It follows IPython's
  conventions for what the model sees: leading indentation and ``>>>`` prompts stripped, the last
  expression's value displayed (IPython-style pretty printing of containers), tracebacks in IPython's
  Plain layout (which the server's post-processing reduces to NeMo-Skills' text), SystemExit reported
  rather than obeyed, top-level ``await``. No magics (``%``/``!`` lines are a SyntaxError).
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import io
import re
import sys
import types

# ---------------------------------------------------------------- capped output capture


class _BinarySink:
    """`sys.stdout.buffer` for code that writes bytes: decoded (invalid bytes replaced) into the capture."""

    def __init__(self, text_sink: Capture):
        self._sink = text_sink

    def write(self, data) -> int:
        self._sink.write(bytes(data).decode("utf-8", "replace"))
        return len(data)

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True


class Capture(io.TextIOBase):
    """A text stream keeping at most `cap` characters (the head, as NeMo-Skills' truncation keeps)."""

    encoding = "utf-8"
    errors = "replace"

    def __init__(self, cap: int):
        super().__init__()
        self._parts: list[str] = []
        self._size = 0
        self._cap = cap
        self.dropped = 0
        self.buffer = _BinarySink(self)

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, s) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        room = self._cap - self._size
        if room > 0:
            part = s[:room]
            self._parts.append(part)
            self._size += len(part)
        self.dropped += max(0, len(s) - max(room, 0))
        return len(s)

    def getvalue(self) -> str:
        return "".join(self._parts)


# ---------------------------------------------------------------- IPython


class IPythonShell:
    name = "ipython"

    def __init__(self):
        from traitlets.config import Config

        config = Config()
        config.HistoryManager.enabled = False  # no sqlite file in a read-only home
        try:
            from IPython.terminal.interactiveshell import TerminalInteractiveShell as Shell
        except Exception:  # prompt_toolkit missing or unusable: the core shell prints the same
            from IPython.core.interactiveshell import InteractiveShell as Shell
        self.shell = Shell(config=config)

    def run_cell(self, code: str, verbosity: str) -> bool:
        try:
            self.shell.InteractiveTB.set_mode(mode=verbosity)
        except Exception:
            self.shell.InteractiveTB.set_mode(mode="Plain")
        result = self.shell.run_cell(code)
        return bool(result.error_before_exec or result.error_in_exec)


# ---------------------------------------------------------------- builtin


def _strip_leading(lines: list[str]) -> list[str]:
    """IPython's cleanup transforms: leading empty lines, leading indentation, >>> / In [n]: prompts."""
    for i, line in enumerate(lines):
        if line and not line.isspace():
            lines = lines[i:]
            break
    else:
        return lines
    m = re.match(r"^[ \t]+", lines[0])
    if m:
        space = m.group(0)
        lines = [ln[len(space) :] if ln.startswith(space) else ln for ln in lines]
    for initial, prompt in (
        (r"^>>>( |$)", r"^(>>>|\.\.\.)( |$)"),
        (r"^In \[\d+\]: ", r"^(In \[\d+\]: |\s*\.{3,}: ?)"),
    ):
        if re.match(initial, lines[0]) or (len(lines) > 1 and re.match(prompt, lines[1])):
            lines = [re.sub(prompt, "", ln, count=1) for ln in lines]
    return lines


def pretty(obj, width: int = 79) -> str:
    """IPython-style pretty printing of builtin containers: if the repr does not fit, the outermost
    container breaks first, one item per line, indented by nesting depth; anything else is its repr."""

    def fits(text: str, indent: int, extra: int) -> bool:
        return "\n" not in text and indent + len(text) + extra <= width

    def fmt(o, indent: int, extra: int) -> str:
        flat = repr(o)
        kind = type(o)
        if fits(flat, indent, extra) or kind.__repr__ not in (
            list.__repr__,
            tuple.__repr__,
            dict.__repr__,
            set.__repr__,
            frozenset.__repr__,
        ):
            return flat
        if isinstance(o, dict):
            if not o:
                return flat
            items = list(o.items())
            parts = []
            for i, (k, v) in enumerate(items):
                tail = 1 if i < len(items) - 1 else 1 + extra
                key = repr(k) + ": "
                parts.append(key + fmt(v, indent + 1, tail))
            return "{" + (",\n" + " " * (indent + 1)).join(parts) + "}"
        if isinstance(o, (set, frozenset)):
            try:
                seq = sorted(o)
            except Exception:
                seq = list(o)
            if not seq:
                return flat
            open_, close = ("{", "}") if kind is set else ("frozenset({", "})")
        elif isinstance(o, tuple):
            seq, open_, close = list(o), "(", ",)" if len(o) == 1 else ")"
        else:
            seq, open_, close = list(o), "[", "]"
        if not seq:
            return flat
        inner = indent + len(open_)
        parts = [fmt(x, inner, 1 if i < len(seq) - 1 else len(close) + extra) for i, x in enumerate(seq)]
        return open_ + (",\n" + " " * inner).join(parts) + close

    return fmt(obj, 0, 0)


def _exit_noop(*_args, **_kwargs):
    """IPython's exit()/quit() in a non-interactive shell do nothing."""


class BuiltinShell:
    name = "builtin"
    _flags = 0x200 | 0x4000 | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT  # codeop's DONT_IMPLY_DEDENT|ALLOW_INCOMPLETE

    def __init__(self):
        main = types.ModuleType("__main__")
        sys.modules["__main__"] = main
        self.ns = main.__dict__
        self.ns.update({"__builtins__": builtins, "exit": _exit_noop, "quit": _exit_noop})
        self.count = 0
        self.out: dict[int, object] = {}
        self._loop = None
        self._lines: dict[str, list[str]] = {}

    # The cell's source is registered with linecache so tracebacks show the lines, as IPython does.
    def _register(self, filename: str, source: str) -> None:
        import linecache

        lines = source.splitlines(keepends=True)
        linecache.cache[filename] = (len(source), None, lines, filename)

    def _compile(self, node, filename: str, mode: str):
        return compile(node, filename, mode, flags=self._flags, dont_inherit=True)

    def _exec(self, code) -> object:
        import inspect

        if code.co_flags & inspect.CO_COROUTINE:
            import asyncio

            if self._loop is None or self._loop.is_closed():
                self._loop = asyncio.new_event_loop()
            return self._loop.run_until_complete(eval(code, self.ns))
        return eval(code, self.ns)

    def run_cell(self, code: str, verbosity: str) -> bool:
        self.count += 1
        source = "\n".join(_strip_leading(code.splitlines())) + "\n"
        digest = hashlib.sha1(source.encode("utf-8", "replace")).hexdigest()[:12]
        filename = f"<ipython-input-{self.count}-{digest}>"
        self._register(filename, source)
        try:
            tree = compile(source, filename, "exec", flags=ast.PyCF_ONLY_AST | self._flags, dont_inherit=True)
        except (SyntaxError, ValueError, OverflowError, MemoryError, RecursionError) as exc:
            self._show_syntax_error(exc, verbosity)
            return True
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = tree.body.pop()
        try:
            if tree.body:
                self._exec(self._compile(tree, filename, "exec"))
            if last is not None:
                value = self._exec(self._compile(ast.Expression(last.value), filename, "eval"))
                self._display(value)
        except SystemExit as exc:
            msg = "" if exc.code is None else f": {exc.code}"
            print(f"An exception has occurred, use %tb to see the full traceback.\nSystemExit{msg}\n")
            return True
        except BaseException as exc:  # noqa: BLE001 — everything the cell raises is reported, nothing escapes
            self._show_traceback(exc, verbosity)
            return True
        return False

    def _display(self, value) -> None:
        if value is None:
            return
        self.ns["___"] = self.ns.get("__")
        self.ns["__"] = self.ns.get("_")
        self.ns["_"] = value
        self.out[self.count] = value
        text = pretty(value)
        sep = "\n" if "\n" in text else ""
        print(f"Out[{self.count}]: {sep}{text}")

    # -- tracebacks in IPython's Plain layout

    @staticmethod
    def _exception_only(exc: BaseException) -> list[str]:
        name = type(exc).__name__
        try:
            text = str(exc)
        except Exception:
            text = "<exception str() failed>"
        lines = [f"{name}: {text}" if text else name]
        for note in getattr(exc, "__notes__", None) or []:
            lines.append(str(note))
        return lines

    def _syntax_lines(self, exc: SyntaxError, verbosity: str) -> list[str]:
        lines = []
        if verbosity != "Minimal":
            lines.append(f"  File {exc.filename}:{exc.lineno}")
            text = exc.text
            if text is not None:
                text = text.rstrip("\n")
                lines.append("    " + text.strip())
                if exc.offset is not None:
                    start = len(text) - len(text.lstrip())
                    caret = "".join(c if c.isspace() else " " for c in text[start : exc.offset - 1])
                    lines.append("    " + caret + "^")
        lines.append(f"{type(exc).__name__}: {exc.msg}")
        return lines

    def _show_syntax_error(self, exc: BaseException, verbosity: str) -> None:
        if isinstance(exc, SyntaxError):
            print("\n".join(self._syntax_lines(exc, verbosity)) + "\n")
        else:
            print("\n".join(self._exception_only(exc)) + "\n")

    def _frames(self, exc: BaseException) -> list[str]:
        lines = []
        tb = exc.__traceback__
        # the first frames are this shell's own (run_cell / _exec)
        while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
            tb = tb.tb_next
        import linecache

        while tb is not None:
            code = tb.tb_frame.f_code
            where = f"  File {code.co_filename}:{tb.tb_lineno}"
            if code.co_name != "<module>":
                where += f" in {code.co_name}"
            lines.append(where)
            src = linecache.getline(code.co_filename, tb.tb_lineno).strip()
            if src:
                lines.append("    " + src)
            tb = tb.tb_next
        return lines

    def _one(self, exc: BaseException, verbosity: str) -> list[str]:
        if isinstance(exc, SyntaxError) and exc.__traceback__ is None:
            return self._syntax_lines(exc, verbosity)
        if verbosity == "Minimal":
            return self._exception_only(exc)
        body = ["Traceback (most recent call last):"] + self._frames(exc)
        if isinstance(exc, SyntaxError):
            return body + self._syntax_lines(exc, verbosity)
        return body + self._exception_only(exc)

    def _show_traceback(self, exc: BaseException, verbosity: str) -> None:
        chain: list[tuple[BaseException, str | None]] = []
        seen: set[int] = set()
        cur: BaseException | None = exc
        link: str | None = None
        while cur is not None and id(cur) not in seen:
            seen.add(id(cur))
            chain.append((cur, link))
            if cur.__cause__ is not None:
                cur, link = (
                    cur.__cause__,
                    "The above exception was the direct cause of the following exception:",
                )
            elif cur.__context__ is not None and not cur.__suppress_context__:
                cur, link = (
                    cur.__context__,
                    "During handling of the above exception, another exception occurred:",
                )
            else:
                cur = None
        out: list[str] = []
        for i, (e, _) in enumerate(reversed(chain)):
            if i:
                # the link text belongs to the exception that follows, i.e. the previous one in `chain`
                out += ["", chain[len(chain) - i][1] or ""]
            out += self._one(e, verbosity)
        print("\n".join(out) + "\n")


def make_shell(preference: str):
    """`auto`: IPython if it imports, else builtin. Returns (shell, warning or None)."""
    if preference in ("auto", "ipython"):
        try:
            return IPythonShell(), None
        except Exception as exc:  # noqa: BLE001
            if preference == "ipython":
                raise
            return (
                BuiltinShell(),
                f"IPython unavailable ({type(exc).__name__}: {exc}); using the builtin shell",
            )
    return BuiltinShell(), None
