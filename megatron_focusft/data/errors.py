"""The one error type of the data pipeline: a bad record, a bad file or a bad tokenizer folder."""

from __future__ import annotations


class DataError(ValueError):
    """A data problem, with where it happened (``file:line``) and a short reason key for the summary.

    ``str(err)`` reads ``data.jsonl:17: assistant turn with empty content and no tool_calls``.
    ``reason`` is a stable key (``malformed_json``, ``unknown_role``, ``empty_assistant``, ``orphan_tool``,
    ``no_response``, ``too_long``, ``bad_record``, ``bad_encoding``, ``template``, ``tokenizer``, ``bad_file``,
    ``unexpected``) used to count skips; a whole run's failures also use ``empty`` (every record skipped),
    ``exists`` (a dataset already at the output prefix), ``write_failed`` (the output cannot be written),
    and ``worker_died`` (a preprocessing worker process ended without a result).
    """

    def __init__(self, message: str, reason: str = "bad_record", location: str | None = None):
        self.message = message
        self.reason = reason
        self.location = location
        super().__init__(f"{location}: {message}" if location else message)

    def at(self, location: str) -> DataError:
        """The same error, placed at ``location`` (kept when one is already set)."""
        if self.location:
            return self
        return DataError(self.message, self.reason, location)

    def __reduce__(self):  # picklable across worker processes
        return (DataError, (self.message, self.reason, self.location))
