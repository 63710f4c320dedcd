"""The record layouts users bring, each turned into one canonical conversation in the OpenAI messages form.

``openai``    ``{"messages": [{"role": system|user|assistant|tool, "content", "tool_calls"?, "tool_call_id"?}],
              "tools"?: [schemas]}``
``sharegpt``  LLaMA-Factory's: ``{"conversations": [{"from": human|gpt|system|function_call|observation,
              "value"}], "system"?: str, "tools"?: JSON string}``; ``function_call`` is the assistant's tool call
              (a JSON object ``{"name", "arguments"}`` or a list of them), ``observation`` the tool's result.
``swift``     ms-swift's agent form: ``{"messages": [{"role": ...|tool_call|tool_response, "content"}], "tools"?:
              JSON string}``; ``tool_call`` content is a JSON ``{"name", "arguments"}``; everything OpenAI's
              messages hold is accepted too.
``alpaca``    ``{"instruction", "input"?, "output", "system"?, "history"?: [[instruction, response], ...]}``;
              instruction and input joined by a newline (as LLaMA-Factory does), history before them.

Every layout may carry a top-level ``system`` string: it becomes the system turn (a record that also has a
different system turn is refused rather than one of them silently dropped).  Tool calls that follow an
assistant turn, or each other, are that one assistant turn's calls (parallel calls); tools given as bare function
schemas are wrapped as ``{"type": "function", "function": schema}`` (as LLaMA-Factory and ms-swift do).  Each
tool call is trained as assistant output; each tool result is context.

:func:`detect_format` tells the layout of a file from its first records (:data:`DETECT_RECORDS`); the rules are
in :func:`record_formats`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Literal

from .errors import DataError
from .reading import iter_file_records, parse_record

RecordFormat = Literal["openai", "sharegpt", "swift", "alpaca"]
FORMATS: tuple[RecordFormat, ...] = ("openai", "sharegpt", "swift", "alpaca")
ROLES = ("system", "user", "assistant", "tool")
# Each layout's own role names, as canonical roles; "tool_call" is an assistant's tool call written as a turn.
SHAREGPT_TAGS = {"human": "user", "gpt": "assistant", "function_call": "tool_call", "observation": "tool"}
SWIFT_TAGS = {"tool_call": "tool_call", "tool_response": "tool"}
DETECT_RECORDS = 64  # records read from the start of a file to tell its layout
DETECT_MAX_BYTES = 1 << 20  # longer JSONL lines are left out of detection (parsing a 50 MB line costs seconds)


@dataclass(frozen=True)
class FieldNames:
    """Where a record keeps its conversation: field names, each ``None`` for the layout's own (``messages`` /
    sharegpt's ``conversations``, ``role`` / ``from``, ``content`` / ``value``), and role renames.

    ``role_map`` renames roles before anything else, e.g. ``{"bot": "assistant"}``.
    """

    messages: str | None = None
    role: str | None = None
    content: str | None = None
    tool_calls: str = "tool_calls"
    tools: str = "tools"
    system: str = "system"
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    history: str = "history"
    role_map: dict[str, str] = field(default_factory=dict)

    def __hash__(self):  # usable as a cache key / picklable value
        return hash((self.messages, self.role, self.content, self.tool_calls, self.tools, self.system))

    def of(self, record_format: RecordFormat) -> FieldNames:
        """These names with the layout's own where none is given."""
        sharegpt = record_format == "sharegpt"
        return replace(
            self,
            messages=self.messages or ("conversations" if sharegpt else "messages"),
            role=self.role or ("from" if sharegpt else "role"),
            content=self.content or ("value" if sharegpt else "content"),
        )


OPENAI_FIELDS = FieldNames().of("openai")


# --------------------------------------------------------------------------------------------- fields
def text_content(content, where: str, name: str = "content") -> str:
    """A message's content as text: a string, null, or a list of OpenAI text parts (strings or
    ``{"type": "text", "text": str}``); anything else is a ``DataError`` naming the field ``name``."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: only text parts are supported
        parts = []
        for k, part in enumerate(content):
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise DataError(
                    f"{where}: field {name!r} part {k}: unsupported content part {str(part)[:60]!r} "
                    '(expected a string or {"type": "text", "text": <string>})',
                    "bad_record",
                )
        return "".join(parts)
    raise DataError(
        f"{where}: field {name!r}: content must be a string or a list of text parts, got {type(content).__name__}",
        "bad_record",
    )


def _json_field(record: dict, name: str):
    """A field's value, with a JSON string (as Parquet columns and LLaMA-Factory's ``tools`` hold) parsed."""
    value = record.get(name)
    if isinstance(value, str):
        try:
            return json.loads(value) if value.strip() else None
        except json.JSONDecodeError:
            raise DataError(f"field {name!r} is not valid JSON", "malformed_json") from None
    return value


def _list_field(record: dict, name: str) -> list:
    turns = _json_field(record, name)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"field {name!r} missing or not a non-empty list", "bad_record")
    return turns


def _tools_field(record: dict, fields: FieldNames, wrap: bool) -> list | None:
    tools = _json_field(record, fields.tools)
    if tools is not None and not isinstance(tools, list):
        raise DataError(f"field {fields.tools!r} must be a list of function schemas", "bad_record")
    if not tools or not wrap:
        return tools or None
    for k, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise DataError(f"field {fields.tools!r} item {k}: a function schema must be an object", "bad_record")
    return [t if t.get("type") == "function" else {"type": "function", "function": t} for t in tools]


def _role(msg: dict, where: str, fields: FieldNames, tags: dict[str, str]) -> str:
    """The message's canonical role (``tool_call`` included where the layout has it)."""
    role = msg.get(fields.role)
    accepted = (*ROLES, *tags)
    canonical = (*ROLES, *tags.values())
    if role is not None and not isinstance(role, str):  # (a missing role is an unknown role, below)
        raise DataError(
            f"{where}: field {fields.role!r} must be a string (one of {', '.join(accepted)}), "
            f"got {type(role).__name__} {str(role)[:40]}",
            "bad_record",
        )
    role = fields.role_map.get(role, role)
    role = tags.get(role, role)
    if role not in canonical:
        raise DataError(f"{where}: unknown role {role!r} (expected one of {', '.join(accepted)})", "unknown_role")
    return role


# --------------------------------------------------------------------------------------------- layouts
Turns = list[tuple[str, dict]]  # (where, an OpenAI-form message not yet validated)


def _openai_turns(record: dict, fields: FieldNames) -> Turns:
    return [(f"message {i}", m) for i, m in enumerate(_list_field(record, fields.messages))]


def _tagged_turns(record: dict, fields: FieldNames, tags: dict[str, str]) -> Turns:
    """sharegpt / swift: turns with the layout's role tags as OpenAI messages; tool-call turns joined to the
    assistant turn they follow (or that the first of them starts)."""
    out: Turns = []
    for i, msg in enumerate(_list_field(record, fields.messages)):
        where = f"message {i}"
        if not isinstance(msg, dict):
            raise DataError(f"{where}: a message must be an object", "bad_record")
        role = _role(msg, where, fields, tags)
        if role != "tool_call":
            turn = {**msg, "role": role, "content": text_content(msg.get(fields.content), where, fields.content)}
            out.append((where, turn))
            continue
        calls = _tool_call_turn(msg.get(fields.content), where, fields.content)
        if out and out[-1][1]["role"] == "assistant":
            prev = out[-1][1]
            prev["tool_calls"] = [*(prev.get("tool_calls") or []), *calls]
        else:
            out.append((where, {"role": "assistant", "content": "", "tool_calls": calls}))
    return out


def _tool_call_turn(content, where: str, name: str) -> list:
    """A tool-call turn's calls: its content is a JSON object ``{"name", "arguments"}`` or a list of them."""
    if isinstance(content, str):
        try:
            content = json.loads(content)
        except json.JSONDecodeError:
            raise DataError(f"{where}: field {name!r} of a tool call is not valid JSON", "bad_record") from None
    calls = content if isinstance(content, list) else [content]
    if not calls or not all(isinstance(c, dict) for c in calls):
        raise DataError(
            f'{where}: field {name!r} of a tool call must be a JSON object {{"name", "arguments"}} or a list of them',
            "bad_record",
        )
    return calls


def _alpaca_turns(record: dict, fields: FieldNames) -> Turns:
    out: Turns = []
    history = _json_field(record, fields.history) or []
    if not isinstance(history, list):
        raise DataError(f"field {fields.history!r} must be a list of [instruction, response] pairs", "bad_record")
    for k, pair in enumerate(history):
        where = f"field {fields.history!r} item {k}"
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise DataError(f"{where}: expected an [instruction, response] pair of strings", "bad_record")
        out += [(where, {"role": "user", "content": pair[0]}), (where, {"role": "assistant", "content": pair[1]})]
    query = [text_content(record.get(name), f"field {name!r}", name) for name in (fields.instruction, fields.input)]
    out.append((f"field {fields.instruction!r}", {"role": "user", "content": "\n".join(q for q in query if q)}))
    answer = text_content(record.get(fields.output), f"field {fields.output!r}", fields.output)
    out.append((f"field {fields.output!r}", {"role": "assistant", "content": answer}))
    return out


# --------------------------------------------------------------------------------------------- canonical form
def normalize_conversation(
    record: dict, fields: FieldNames | None = None, record_format: RecordFormat = "openai"
) -> tuple[list[dict], list | None]:
    """Validate a record of ``record_format`` and return (messages, tools) in a canonical form.

    Each message becomes ``{"role", "content": str}`` plus ``"tool_calls": [{"name", "arguments", "id"?}]`` on
    an assistant turn that calls tools and ``"tool_call_id"`` on a tool result that names one.  Raises
    :class:`DataError` (without location) on bad input, naming the message (or field) and the field.
    """
    if record_format not in FORMATS:
        raise ValueError(f"record_format must be one of {', '.join(FORMATS)}, got {record_format!r}")
    fields = (fields or FieldNames()).of(record_format)
    if record_format == "openai":
        turns, names = _openai_turns(record, fields), fields
    elif record_format == "alpaca":
        turns, names = _alpaca_turns(record, fields), OPENAI_FIELDS
    else:
        tags = SHAREGPT_TAGS if record_format == "sharegpt" else SWIFT_TAGS
        turns, names = _tagged_turns(record, fields, tags), OPENAI_FIELDS
    out: list[dict] = []
    for where, msg in turns:
        out.append(_normalize_message(msg, where, names, out))
    tools = None if record_format == "alpaca" else _tools_field(record, fields, wrap=record_format != "openai")
    return _with_system(record, fields, out), tools


def _with_system(record: dict, fields: FieldNames, messages: list[dict]) -> list[dict]:
    """The record's top-level system prompt as its first turn; one that differs from a system turn the
    conversation already starts with is an error (neither may be dropped silently)."""
    system = record.get(fields.system)
    if system is None or system == "":
        return messages
    if not isinstance(system, str):
        raise DataError(f"field {fields.system!r} must be a string, got {type(system).__name__}", "bad_record")
    if messages and messages[0]["role"] == "system":
        if messages[0]["content"] != system:
            raise DataError(
                f"field {fields.system!r} and the conversation's own system turn differ; keep one", "bad_record"
            )
        return messages
    return [{"role": "system", "content": system}, *messages]


def _tool_call(call, where: str) -> dict:
    if not isinstance(call, dict):
        raise DataError(f"{where}: a tool call must be an object", "bad_record")
    fn = call.get("function", call)
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or not name:
        raise DataError(f"{where}: tool call without a function name", "bad_record")
    args = fn.get("arguments", {})
    if args is None:
        args = {}
    if isinstance(args, str):  # OpenAI form: arguments as a JSON string
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            raise DataError(f"{where}: tool call arguments are not valid JSON", "bad_record") from None
    out = {"name": name, "arguments": args}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def _normalize_message(msg, where: str, fields: FieldNames, previous: list[dict]) -> dict:
    """One message in canonical form; ``previous`` are the conversation's messages before it, normalized."""
    if not isinstance(msg, dict):
        raise DataError(f"{where}: a message must be an object", "bad_record")
    role = _role(msg, where, fields, {})
    content = text_content(msg.get(fields.content), where, fields.content)
    norm = {"role": role, "content": content}
    if role == "assistant":
        calls = msg.get(fields.tool_calls) or []
        if not isinstance(calls, list):
            raise DataError(f"{where}: tool_calls must be a list", "bad_record")
        if calls:
            norm["tool_calls"] = [_tool_call(c, where) for c in calls]
        elif not content.strip():
            raise DataError(f"{where}: assistant turn with empty content and no tool_calls", "empty_assistant")
    elif role == "tool":
        _check_tool_answer(msg, where, previous)
        if isinstance(msg.get("tool_call_id"), str):
            norm["tool_call_id"] = msg["tool_call_id"]
    return norm


def _check_tool_answer(msg: dict, where: str, previous: list[dict]) -> None:
    """A tool message answers the closest assistant turn before it (past other tool messages), which must
    call tools, and names one of its calls' ids when both carry ids."""
    j = len(previous) - 1
    while j >= 0 and previous[j]["role"] == "tool":
        j -= 1
    if j < 0 or previous[j]["role"] != "assistant" or not previous[j].get("tool_calls"):
        raise DataError(f"{where}: tool message with no preceding tool call", "orphan_tool")
    call_id = msg.get("tool_call_id")
    ids = [c["id"] for c in previous[j]["tool_calls"] if "id" in c]
    if isinstance(call_id, str) and ids and call_id not in ids:
        raise DataError(f"{where}: tool message answers unknown tool_call_id {call_id!r}", "orphan_tool")


# --------------------------------------------------------------------------------------------- detection
def record_formats(record: dict, fields: FieldNames | None = None) -> set[RecordFormat]:
    """The layouts a record looks like (empty: none; more than one: ambiguous), each only where that layout's
    reading of the record finds its turns (the field names are each layout's own unless given):

    * ``alpaca``: it has the ``instruction`` and ``output`` fields;
    * ``openai`` / ``swift``: turns under ``messages`` with a ``role``; ``swift`` when a role (after
      ``role_map``) is ``tool_call`` or ``tool_response``; none of ShareGPT's tags;
    * ``sharegpt``: turns under ``conversations`` with a ``from``; none of ms-swift's tags.

    Where the given names make both readings the same (``--messages-field conversations --role-field from``),
    ShareGPT's tags (``human``, ``gpt``, ``function_call``, ``observation``) or a role field named ``from``
    make it ``sharegpt``, else the OpenAI reading stands.
    """
    fields = fields or FieldNames()
    found: set[RecordFormat] = set()
    if fields.instruction in record and fields.output in record:
        found.add("alpaca")
    messages_like = _turn_roles(record, fields.of("openai"))
    if messages_like is not None and not messages_like & SHAREGPT_TAGS.keys():
        found.add("swift" if messages_like & SWIFT_TAGS.keys() else "openai")
    sharegpt_like = _turn_roles(record, fields.of("sharegpt"))
    if sharegpt_like is not None and not sharegpt_like & SWIFT_TAGS.keys():
        found.add("sharegpt")
    same_reading = fields.of("openai").messages == fields.of("sharegpt").messages and fields.role is not None
    if same_reading and "sharegpt" in found and found & {"openai", "swift"}:
        tagged = (messages_like or set()) & SHAREGPT_TAGS.keys()
        found -= {"openai", "swift"} if tagged or fields.role == "from" else {"sharegpt"}
    return found


def _turn_roles(record: dict, fields: FieldNames) -> set[str] | None:
    """The roles (after ``role_map``) of the turns under ``fields.messages`` that have a ``fields.role``; None
    when there are no such turns."""
    try:
        turns = _json_field(record, fields.messages)
    except DataError:
        return None
    turns = [t for t in turns if isinstance(t, dict) and fields.role in t] if isinstance(turns, list) else []
    if not turns:
        return None
    return {fields.role_map.get(r, r) for t in turns if isinstance(r := t[fields.role], str)}


def detect_format(path: str, fields: FieldNames | None = None) -> RecordFormat:
    """The layout of the records in ``path``, from its first :data:`DETECT_RECORDS` records.

    Records of OpenAI's layout and ms-swift's mix (``swift`` reads both); any other mix, a record that fits two
    layouts, or first records that fit none is a ``DataError(reason="bad_file")`` naming the file and the
    fields seen.  Records that do not parse are left to be reported one by one; with none to go by (an empty
    file), ``openai``.
    """
    seen: dict[RecordFormat, str] = {}  # layout -> first location
    unknown_fields: dict[str, None] = {}
    for record, location, formats in _first_records(path, fields):
        if len(formats) > 1:
            raise DataError(
                f"{path}: cannot tell the record format: {location} fits {' and '.join(sorted(formats))} "
                f"(fields: {_names(record)}); pass --format",
                "bad_file",
            )
        if not formats:
            unknown_fields.update(dict.fromkeys(map(str, record)))
        for fmt in formats:
            seen.setdefault(fmt, location)
    if "swift" in seen:
        seen.pop("openai", None)
    if len(seen) > 1:
        kinds = ", ".join(f"{fmt} (first at {loc})" for fmt, loc in seen.items())
        raise DataError(f"{path}: records of more than one format: {kinds}; pass --format", "bad_file")
    if seen:
        return next(iter(seen))
    if unknown_fields:
        raise DataError(
            f"{path}: cannot tell the record format (fields seen: {', '.join(list(unknown_fields)[:20])}; expected "
            "'messages' of role/content (openai, swift), 'conversations' of from/value (sharegpt) or "
            "'instruction' + 'output' (alpaca)); pass --format or the field flags",
            "bad_file",
        )
    return "openai"


def _first_records(path: str, fields: FieldNames | None) -> Iterable[tuple[dict, str, set[RecordFormat]]]:
    """(record, location, :func:`record_formats`) of the first :data:`DETECT_RECORDS` records of ``path`` that
    parse as objects."""
    count = 0
    for rec in iter_file_records(path):
        if count == DETECT_RECORDS:
            return
        count += 1
        if isinstance(rec.raw, bytes | str) and len(rec.raw) > DETECT_MAX_BYTES:
            continue
        try:
            record = parse_record(rec)
            formats = record_formats(record, fields)
        except (DataError, RecursionError):  # (absurdly nested JSON) reported when the record is encoded
            continue
        yield record, rec.location, formats


def _names(record: dict) -> str:
    return ", ".join(map(str, list(record)[:20]))
