"""A plain-text log of a run: everything the process prints (stdout, stderr, `logging` records, warnings) also goes
to one file, e.g. `<output_dir>/train.log`, as mmseg keeps its `<timestamp>.log`.

    with RunLog(os.path.join(args.output_dir, "train.log"), header="scripts/train.py --config ..."):
        ...   # the stage plan, selection lines, warnings, evaluation tables land in the file as on the terminal

The terminal output is unchanged. In the file, a progress bar (lines rewritten with carriage returns) keeps only
its last state. The file is appended to (a resumed run continues its log), a header line marks each start.
A traceback that ends the run is written to the file as well.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from typing import Optional


class _LogFile:
    """The shared file: whole lines only, each reduced to what a terminal shows after its last carriage return."""

    def __init__(self, path: str):
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by RunLog.close
        self._pending = ""
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        with self._lock:
            self._pending += text
            if "\n" not in self._pending:
                return
            *lines, self._pending = self._pending.split("\n")
            self._f.write("".join(line.rstrip("\r").rsplit("\r", 1)[-1] + "\n" for line in lines))
            self._f.flush()

    def close(self) -> None:
        with self._lock:
            if self._pending.strip():
                self._f.write(self._pending.rsplit("\r", 1)[-1] + "\n")
            self._pending = ""
            self._f.close()


class _Tee:
    """A text stream that writes to `stream` and to the log file."""

    def __init__(self, stream, log: _LogFile):
        self._stream, self._log = stream, log

    def write(self, text: str) -> int:
        n = self._stream.write(text)
        self._log.write(text)
        return n

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name):  # encoding, isatty, fileno, ...: the terminal's
        return getattr(self._stream, name)


class RunLog:
    """Copy this process's output into `path` until `close()` (or the end of a `with` block)."""

    def __init__(self, path: str, header: Optional[str] = None):
        self.path = path
        self._log = _LogFile(path)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        self._log.write(f"==== {stamp} {header or ''}".rstrip() + "\n")
        self._streams = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = _Tee(sys.stdout, self._log), _Tee(sys.stderr, self._log)
        # logging handlers made before now hold the terminal's stream itself: point them at the tee
        self._handlers = []
        for handler in _stream_handlers():
            for old, tee in zip(self._streams, (sys.stdout, sys.stderr)):
                if handler.stream is old:
                    self._handlers.append((handler, old))
                    handler.setStream(tee)
        self._closed = False

    def close(self, exc: Optional[BaseException] = None) -> None:
        if self._closed:
            return
        self._closed = True
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        if exc is not None and not isinstance(exc, (SystemExit, KeyboardInterrupt)):
            # the traceback reaches the terminal after this (sys.excepthook); the file gets it now
            self._log.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        for handler, old in self._handlers:
            handler.setStream(old)
        sys.stdout, sys.stderr = self._streams
        self._log.close()

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exc)


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    return [h for lg in loggers for h in lg.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
