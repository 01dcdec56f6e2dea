"""Logging: module loggers (`logging.getLogger(__name__)`) through Hydra's handlers, so the run folder's
`merge-anneal.log` holds what the console showed (conf/hydra/job_logging/merge_anneal.yaml).

The libraries' own log lines and Python warnings go through the same handlers. By default only their errors
pass (mergekit's INFO lines, transformers' and TRL's notices are noise for a pipeline user), and of the libraries'
progress bars only those of long work show (the merge's graph, the reference pass, lm-eval's requests; the anneal's
training bar is the stage's own): loading weights, writing shards, mapping data sets are instant steps.
`pipeline.verbose=true` lets everything through.
"""

import functools
import logging

OURS = ("pipeline", "stages", "merge-anneal", "__main__")
# The progress bars that show without pipeline.verbose: by their description's start.
LONG_WORK = (
    "anneal",
    "eval",
    "merge",
    "Executing graph",  # mergekit's merge
    "Computing reference log probs",  # the reference pass (TRL's precompute)
    "Running loglikelihood",  # lm-eval's requests
    "Running generate_until",
)


class LibraryFilter(logging.Filter):
    """Passes merge-anneal's own records, and the libraries' (and warnings') from `level` up."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".")[0] in OURS or record.levelno >= self.level


def route_library_logs(verbose: bool, datasets: bool = True) -> None:
    """Send transformers', datasets' (unless `datasets` is false: a run that never reads data, such as a merge
    alone, need not import it) and Python's warnings through the root handlers, filtered unless `verbose`; the
    libraries' progress bars for instant steps off unless `verbose`."""
    import transformers.utils.logging as transformers_logging

    quiet_progress_bars(not verbose)

    libraries = [transformers_logging]
    if datasets:
        import datasets.utils.logging as datasets_logging

        libraries.append(datasets_logging)
        # datasets' bars for instant steps (map, filter, flatten, parquet) are noise; training and the reference
        # pass keep theirs
        (datasets_logging.enable_progress_bar if verbose else datasets_logging.disable_progress_bar)()
    logging.captureWarnings(True)
    for library in libraries:  # each has a stderr handler of its own: use ours
        logging.getLogger(library.__name__.split(".")[0]).handlers.clear()
        library.enable_propagation()
        library.set_verbosity(logging.INFO if verbose else logging.WARNING)
    level = logging.NOTSET if verbose else logging.ERROR
    for handler in logging.getLogger().handlers:
        for old in [f for f in handler.filters if isinstance(f, LibraryFilter)]:
            handler.removeFilter(old)
        handler.addFilter(LibraryFilter(level))


def to_log_file(level: int, message: str) -> None:
    """`message` in the run folder's log only (what the console shows another way, e.g. on stderr)."""
    record = logging.LogRecord("merge-anneal", level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def quiet_progress_bars(quiet: bool) -> None:
    """tqdm bars (every library's) whose description does not start with one of LONG_WORK are created disabled while
    `quiet`: one switch for the instant steps of transformers, datasets, mergekit and lm-eval, which have no common
    setting of their own."""
    import tqdm.std

    init = tqdm.std.tqdm.__init__
    original = getattr(init, "merge_anneal_original", init)
    if not quiet:
        tqdm.std.tqdm.__init__ = original
        return

    @functools.wraps(original)
    def quiet_init(self, *args, **kwargs):
        description = kwargs.get("desc", args[1] if len(args) > 1 else None)
        if not str(description or "").startswith(LONG_WORK):
            kwargs["disable"] = True
        original(self, *args, **kwargs)

    quiet_init.merge_anneal_original = original
    tqdm.std.tqdm.__init__ = quiet_init
