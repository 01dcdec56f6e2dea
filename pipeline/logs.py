"""Logging: module loggers (`logging.getLogger(__name__)`) through Hydra's handlers, so the run folder's
`merge-anneal.log` holds what the console showed (conf/hydra/job_logging/merge_anneal.yaml).

The libraries' own log lines and Python warnings go through the same handlers. By default only their errors
pass (mergekit's INFO lines, transformers' and TRL's notices are noise for a pipeline user), and datasets'
progress bars are off; `pipeline.library_logs=true` lets everything through.
"""

import logging

OURS = ("pipeline", "stages", "merge-anneal", "__main__")


class LibraryFilter(logging.Filter):
    """Passes merge-anneal's own records, and the libraries' (and warnings') from `level` up."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".")[0] in OURS or record.levelno >= self.level


def route_library_logs(library_logs: bool, datasets: bool = True) -> None:
    """Send transformers', datasets' (unless `datasets` is false: a run that never reads data, such as a merge
    alone, need not import it) and Python's warnings through the root handlers, filtered unless `library_logs`."""
    import transformers.utils.logging as transformers_logging

    libraries = [transformers_logging]
    if datasets:
        import datasets.utils.logging as datasets_logging

        libraries.append(datasets_logging)
        # datasets' bars for instant steps (map, filter, flatten, parquet) are noise; training and the reference
        # pass keep theirs
        (datasets_logging.enable_progress_bar if library_logs else datasets_logging.disable_progress_bar)()
    logging.captureWarnings(True)
    for library in libraries:  # each has a stderr handler of its own: use ours
        logging.getLogger(library.__name__.split(".")[0]).handlers.clear()
        library.enable_propagation()
        library.set_verbosity(logging.INFO if library_logs else logging.WARNING)
    level = logging.NOTSET if library_logs else logging.ERROR
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
