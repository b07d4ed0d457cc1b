"""data.files: DataFile and iter_examples over every container (data.readers) and schema (data.schemas), with exact
examples and messages. Long on purpose: each container and schema with its cases side by side."""

import csv
import json
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlora.data.example import Example
from rlora.data.files import SCHEMAS, DataFile, iter_examples
from rlora.errors import ConfigError, DataError

LIST_FIELDS = ("choices", "labels", "history", "messages", "conversations")


# --- writers: the same records in every container ---------------------------------------------------------------


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def write_json(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    return path


def write_csv(path: Path, records: list) -> Path:
    columns = list(dict.fromkeys(key for record in records for key in record))
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        for record in records:
            row = []
            for column in columns:
                value = record.get(column)
                if value is None:
                    row.append("")
                elif column in LIST_FIELDS:
                    row.append(json.dumps(value))
                else:
                    row.append(str(value))
            writer.writerow(row)
    return path


def table(records: list) -> pa.Table:
    """The records as an Arrow table; a record's missing fields are nulls."""
    columns = list(dict.fromkeys(key for record in records for key in record))
    return pa.Table.from_pylist([{column: record.get(column) for column in columns} for record in records])


def write_parquet(path: Path, records: list) -> Path:
    pq.write_table(table(records), path)
    return path


def write_folder(path: Path, records: list) -> Path:
    import datasets

    datasets.Dataset(table(records)).save_to_disk(str(path))
    return path


WRITERS = {
    "jsonl": (write_jsonl, ".jsonl"),
    "json": (write_json, ".json"),
    "csv": (write_csv, ".csv"),
    "parquet": (write_parquet, ".parquet"),
    "folder": (write_folder, ""),
}


def write(tmp_path: Path, kind: str, records: list, name: str = "data") -> Path:
    writer, suffix = WRITERS[kind]
    return writer(tmp_path / f"{name}{suffix}", records)


def read(path, **settings) -> list[Example]:
    return list(iter_examples(DataFile(Path(path), **settings)))


def raises(message: str, path, **settings) -> None:
    """iter_examples fails with exactly `message` ("{p}" stands for the path)."""
    with pytest.raises(DataError) as raised:
        read(path, **settings)
    assert str(raised.value) == message.replace("{p}", str(path))


# --- the same records in every container, per schema ------------------------------------------------------------

ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "id": "sum"},
    {"instruction": "Say hi.", "input": "", "output": "Hi!", "id": "7", "system": "Be kind.", "source": "web"},
    {
        "instruction": "And now?",
        "output": "Still 5.",
        "id": "h",
        "history": [["What is 2+3?", "5"], ["Sure?", "Yes."]],
        "task": "maths",
    },
]
ALPACA_EXAMPLES = [
    Example("alp", "Add the numbers.\n2 and 3", "5", uid="sum", turns=(("user", "Add the numbers.\n2 and 3"),)),
    Example("alp", "Say hi.", "Hi!", uid="7", turns=(("system", "Be kind."), ("user", "Say hi."))),
    Example(
        "maths",
        "And now?",
        "Still 5.",
        uid="h",
        turns=(
            ("user", "What is 2+3?"),
            ("assistant", "5"),
            ("user", "Sure?"),
            ("assistant", "Yes."),
            ("user", "And now?"),
        ),
    ),
]

MESSAGES = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ],
        "id": "a",
    },
    {"messages": [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!"}], "id": "b"},
]
MESSAGES_EXAMPLES = [
    Example(
        "alp",
        "2+2?",
        "4",
        uid="a",
        turns=(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "2+2?")),
    ),
    Example("alp", "Bye", "Bye!", uid="b", turns=(("user", "Bye"),)),
]

SHAREGPT = [
    {
        "conversations": [
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
            {"from": "human", "value": "2+2?"},
            {"from": "gpt", "value": "4"},
        ],
        "system": "Be brief.",
        "id": "a",
    },
    {
        "conversations": [
            {"from": "system", "value": "Be kind."},
            {"from": "user", "value": "Bye"},
            {"from": "assistant", "value": "Bye!"},
        ],
        "id": "b",
    },
]
SHAREGPT_EXAMPLES = [
    Example(
        "alp",
        "2+2?",
        "4",
        uid="a",
        turns=(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "2+2?")),
    ),
    Example("alp", "Bye", "Bye!", uid="b", turns=(("system", "Be kind."), ("user", "Bye"))),
]

RLORA = [
    {"prompt": "Capital of France?", "answer": "Paris", "id": "fr"},
    {"prompt": "Capital of Peru?", "choices": ["Lima", "Quito"], "gold": 0, "id": "pe"},
    {"prompt": "Is Rome a capital?", "choices": ["yes", "no"], "gold": 0, "labels": ["yes", "no"], "id": "ro"},
    {
        "prompt": "Capital of Chile?",
        "choices": ["Lima", "Santiago"],
        "gold": 1,
        "format": "rc",
        "id": "cl",
        "task": "x",
    },
]
RLORA_EXAMPLES = [
    Example("alp", "Capital of France?", "Paris", uid="fr"),
    Example.multiple_choice("alp", "Capital of Peru?", ["Lima", "Quito"], 0, "pe"),
    Example.multiple_choice("alp", "Is Rome a capital?", ["yes", "no"], 0, "ro", ["yes", "no"]),
    Example.multiple_choice("x", "Capital of Chile?", ["Lima", "Santiago"], 1, "cl", format="rc"),
]

CASES = {
    "alpaca": (ALPACA, ALPACA_EXAMPLES),
    "messages": (MESSAGES, MESSAGES_EXAMPLES),
    "sharegpt": (SHAREGPT, SHAREGPT_EXAMPLES),
    "rlora": (RLORA, RLORA_EXAMPLES),
}


@pytest.mark.parametrize("kind", list(WRITERS))
@pytest.mark.parametrize("schema", list(CASES))
def test_every_container_gives_the_same_examples(tmp_path, kind, schema):
    records, expected = CASES[schema]
    path = write(tmp_path, kind, records, name="alp")
    assert read(path, schema=schema) == expected
    assert read(path) == expected  # auto-detected from the first record


@pytest.mark.parametrize(
    ("kind", "uids"),
    [("jsonl", ["t/1", "t/3"]), ("json", ["t/1", "t/2"]), ("csv", ["t/2", "t/4"]), ("parquet", ["t/1", "t/2"])],
)
def test_default_ids_are_the_line_record_or_row_number(tmp_path, kind, uids):
    records = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]
    if kind == "jsonl":
        path = write_jsonl(tmp_path / "t.jsonl", [records[0], "", records[1]])
    elif kind == "csv":
        path = tmp_path / "t.csv"
        path.write_text('instruction,output\n"a",b\n\n"c",d\n', encoding="utf-8")
    else:
        path = write(tmp_path, kind, records, name="t")
    assert [example.uid for example in read(path)] == uids


def test_a_folder_task_is_named_after_the_folder(tmp_path):
    path = write_folder(tmp_path / "my.chats", [{"instruction": "a", "output": "b"}])
    assert read(path) == [Example("my.chats", "a", "b", uid="my.chats/1", turns=(("user", "a"),))]


def test_the_given_task_names_every_record(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "a", "output": "b", "task": "x"}])
    assert [e.task for e in read(path, schema="alpaca", task="mine")] == ["mine"]
    path = write_jsonl(tmp_path / "r.jsonl", RLORA)
    assert {e.task for e in read(path, task="mine")} == {"mine"}


def test_alpaca_input_joins_the_instruction_with_a_newline_and_blank_parts_are_none(tmp_path):
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [
            {"instruction": "Translate.", "input": "chat", "output": "cat", "system": "  ", "history": []},
            {"instruction": "Translate.", "input": "   ", "output": "cat", "system": None, "input2": 3},
            {"instruction": "Translate.", "input": None, "output": "cat", "id": None, "history": None},
            {"instruction": "Translate.", "output": "cat", "id": 7},
        ],
    )
    assert read(path) == [
        Example("t", "Translate.\nchat", "cat", uid="t/1", turns=(("user", "Translate.\nchat"),)),
        Example("t", "Translate.", "cat", uid="t/2", turns=(("user", "Translate."),)),
        Example("t", "Translate.", "cat", uid="t/3", turns=(("user", "Translate."),)),
        Example("t", "Translate.", "cat", uid="7", turns=(("user", "Translate."),)),
    ]


def test_turns_may_use_either_pair_of_keys_and_a_blank_system_turn_is_none(tmp_path):
    sharegpt = write_jsonl(
        tmp_path / "s.jsonl",
        [{"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}],
    )
    assert read(sharegpt) == [Example("s", "q", "a", uid="s/1", turns=(("user", "q"),))]
    turns = [
        {"from": "system", "value": ""},
        {"from": "user", "value": "q"},
        {"from": "assistant", "value": "a", "w": 1},
    ]
    messages = write_jsonl(tmp_path / "m.jsonl", [{"messages": turns, "system": " "}])
    assert read(messages) == [Example("m", "q", "a", uid="m/1", turns=(("user", "q"),))]


def test_json_file_of_json_lines_is_read_as_json_lines(tmp_path):
    path = write_jsonl(
        tmp_path / "t.json", [{"instruction": "a", "output": "b"}, "", {"instruction": "c", "output": "d"}]
    )
    assert [e.uid for e in read(path)] == ["t/1", "t/3"]
    path.write_text('{"instruction": "a", "output": 3}\n')
    raises("{p}:1: field 'output': expected a non-empty string, got 3", path)
    path.write_text('{\n  "data": [{"instruction": "a", "output": "b"}]\n}\n')
    raises(
        "{p}:1: invalid JSON: Expecting property name enclosed in double quotes (column 2); read as JSON Lines, as "
        "the file does not start with '[' (a .json file holds one JSON array of objects, or one object per line)",
        path,
    )


def test_byte_order_marks_are_ignored(tmp_path):
    for name, text in [
        ("t.jsonl", '{"prompt": "p", "answer": "a"}\n'),
        ("t.json", '[{"prompt": "p", "answer": "a"}]'),
        ("t.csv", "prompt,answer\np,a\n"),
    ]:
        path = tmp_path / name
        path.write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert read(path) == [Example("t", "p", "a", uid="t/1" if name != "t.csv" else "t/2")]


def test_csv_cells_empty_missing_lists_as_json_gold_as_integer_and_rows_by_starting_line(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(
        "prompt,answer,choices,gold,id\n"
        '"two\nlines",x,,,\n'  # lines 2-3
        'p,,"[""a"", ""b""]", 1 ,\n'  # line 4
        ",,,,\n"  # a blank row
        "q,y\n",  # line 6, short: the rest is missing
        encoding="utf-8",
    )
    assert read(path) == [
        Example("t", "two\nlines", "x", uid="t/2"),
        Example.multiple_choice("t", "p", ["a", "b"], 1, "t/4"),
        Example("t", "q", "y", uid="t/6"),
    ]


# --- column mapping -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(WRITERS))
def test_columns_rename_the_files_columns_before_detection(tmp_path, kind):
    records = [{"question": "Say hi.", "response": "Hi!", "output": "ignored", "category": "greet"}]
    path = write(tmp_path, kind, records, name="greet")
    columns = (("instruction", "question"), ("output", "response"))
    assert read(path, columns=columns) == [
        Example("greet", "Say hi.", "Hi!", uid="greet/" + ("2" if kind == "csv" else "1"), turns=(("user", "Say hi."),))
    ]


def test_columns_may_swap_fields_and_messages_name_the_column(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"answer": "Q?", "prompt": "A"}, {"answer": "Q2?", "prompt": 3}])
    columns = (("prompt", "answer"), ("answer", "prompt"))
    with pytest.raises(DataError) as raised:
        list(iter_examples(DataFile(path, columns=columns)))
    assert str(raised.value) == f"{path}:2: field 'answer' (column 'prompt'): expected a non-empty string, got 3"
    assert read(write_jsonl(path, [{"answer": "Q?", "prompt": "A"}]), columns=dict(columns)) == [
        Example("t", "Q?", "A", uid="t/1")
    ]


def test_a_column_hidden_by_a_renamed_one_is_an_error_in_the_rlora_schema(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"question": "p", "prompt": "x", "answer": "a"}])
    raises(
        "{p}:1: field 'prompt' (column 'question'): the file also has a column 'prompt'; rename or drop one of them",
        path,
        columns=(("prompt", "question"),),
    )


def test_a_renamed_missing_column_is_named(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "p"}])
    raises("{p}:1: field 'output' (column 'response'): missing", path, columns=(("output", "response"),))


# --- errors ---------------------------------------------------------------------------------------------------

TURN = "{p}:1: field 'conversations'"


@pytest.mark.parametrize(
    ("schema", "record", "message"),
    [
        ("alpaca", {"instruction": "p"}, "{p}:1: field 'output': missing"),
        ("alpaca", {"instruction": "p", "output": 3}, "{p}:1: field 'output': expected a non-empty string, got 3"),
        (
            "alpaca",
            {"instruction": " ", "output": "a"},
            "{p}:1: field 'instruction': expected a non-empty string, got \" \"",
        ),
        ("alpaca", {"instruction": "p", "input": 1, "output": "a"}, "{p}:1: field 'input': expected a string, got 1"),
        (
            "alpaca",
            {"instruction": "p", "output": "a", "system": []},
            "{p}:1: field 'system': expected a string, got []",
        ),
        (
            "alpaca",
            {"instruction": "p", "output": "a", "history": "x"},
            "{p}:1: field 'history': expected a list of [user, assistant] pairs, got \"x\"",
        ),
        (
            "alpaca",
            {"instruction": "p", "output": "a", "history": [["u", "a"], ["u", ""]]},
            '{p}:1: field \'history\': pair 2: expected [user, assistant], two non-empty strings, got ["u", ""]',
        ),
        (
            "alpaca",
            {"instruction": "p", "output": "a", "task": ""},
            "{p}:1: field 'task': expected a non-empty string, got \"\"",
        ),
        (
            "alpaca",
            {"instruction": "p", "output": "a", "id": 1.5},
            "{p}:1: field 'id': expected a string or an integer, got 1.5",
        ),
        (
            "alpaca",
            {"instruction": "p\ud800", "output": "a"},
            "{p}:1: field 'instruction': not valid Unicode text (\\ud800)",
        ),
        (
            "alpaca",
            {"instruction": "p", "output": "a", "id": ["z" * 100]},
            "{p}:1: field 'id': expected a string or an integer, got [\"" + "z" * 55 + "...",
        ),
        ("sharegpt", {"conversations": "hi"}, TURN + ': expected a non-empty list of turns, got "hi"'),
        ("sharegpt", {"conversations": []}, TURN + ": expected a non-empty list of turns, got []"),
        ("sharegpt", {"id": "x"}, TURN + ": missing"),
        (
            "sharegpt",
            {"conversations": ["hi"]},
            TURN + ": turn 1: expected an object with 'role' and 'content', got \"hi\"",
        ),
        (
            "sharegpt",
            {"conversations": [{"speaker": "human", "text": "hi"}]},
            TURN + ': turn 1: expected an object with \'from\' and \'value\', got {"speaker": "human", "text": "hi"}',
        ),
        (
            "sharegpt",
            {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{}"}]},
            TURN + ": turn 2: role 'function_call' is not supported (tool turns are not supported; only human, gpt, "
            "system, user, assistant)",
        ),
        (
            "sharegpt",
            {
                "conversations": [
                    {"from": "human", "value": "q"},
                    {"from": "gpt", "value": "a"},
                    {"from": "tool", "value": "r"},
                ]
            },
            TURN + ": turn 3: role 'tool' is not supported (tool turns are not supported; only human, gpt, system, "
            "user, assistant)",
        ),
        (
            "sharegpt",
            {"conversations": [{"from": "bard", "value": "q"}]},
            TURN + ": turn 1: role 'bard' is not one of human, gpt, system, user, assistant",
        ),
        (
            "sharegpt",
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},
            TURN + ": turn 2: 'value': expected a non-empty string, got \"\"",
        ),
        (
            "sharegpt",
            {"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "r"}]},
            TURN + ": turn 2: expected an assistant turn, got 'human' (after an optional system turn, user and "
            "assistant turns alternate, starting with user)",
        ),
        (
            "sharegpt",
            {"conversations": [{"from": "gpt", "value": "q"}]},
            TURN + ": turn 1: expected a user turn, got 'gpt' (after an optional system turn, user and assistant "
            "turns alternate, starting with user)",
        ),
        (
            "sharegpt",
            {"conversations": [{"from": "human", "value": "q"}, {"from": "system", "value": "s"}]},
            TURN + ": turn 2: a system turn must be the first turn",
        ),
        (
            "sharegpt",
            {"system": "s", "conversations": [{"from": "system", "value": "t"}, {"from": "human", "value": "q"}]},
            TURN + ": turn 1: a system turn, and a 'system' field too; give one of them",
        ),
        (
            "sharegpt",
            {
                "conversations": [
                    {"from": "human", "value": "q"},
                    {"from": "gpt", "value": "a"},
                    {"from": "human", "value": "r"},
                ]
            },
            TURN
            + ": turn 3: the last turn must be an assistant reply, got 'human' (the reply to train on and evaluate)",
        ),
        ("sharegpt", {"conversations": [{"from": "system", "value": "s"}]}, TURN + ": no user and assistant turns"),
        (
            "sharegpt",
            {"conversations": [{"from": "human", "value": "q\ud800"}, {"from": "gpt", "value": "a"}]},
            TURN + ": turn 1: not valid Unicode text (\\ud800)",
        ),
        (
            "messages",
            {"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}]},
            "{p}:1: field 'messages': turn 2: role 'tool' is not supported (tool turns are not supported; only system, "
            "user, assistant)",
        ),
        (
            "messages",
            {"messages": [{"role": "human", "content": "q"}]},
            "{p}:1: field 'messages': turn 1: role 'human' is not one of system, user, assistant",
        ),
        (
            "messages",
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]},
            "{p}:1: field 'messages': turn 2: 'content': expected a non-empty string, got null",
        ),
        (
            "rlora",
            {"prompt": "p", "answer": "a", "source": "x"},
            "{p}:1: unknown field 'source'; known fields: answer, choices, format, gold, id, labels, prompt, task",
        ),
    ],
)
def test_record_errors_name_the_file_line_field_and_turn(tmp_path, schema, record, message):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    raises(message, path, schema=schema)


def test_auto_detection_says_what_each_schema_needs(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"question": "q", "response": "r"}])
    raises(
        "{p}:1: cannot tell the schema from the fields ('question', 'response'): messages needs 'messages'; "
        "sharegpt needs 'conversations'; alpaca needs 'instruction'; rlora needs 'prompt'; give the schema, or map "
        "a column to one of these fields with columns",
        path,
    )


def test_auto_detection_reads_the_first_record_and_holds_the_rest_to_it(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "a", "output": "b"}, {"prompt": "p", "answer": "a"}])
    raises("{p}:2: field 'instruction': missing", path)


@pytest.mark.parametrize(
    ("kind", "location"),
    [("json", "{p}: record 2"), ("parquet", "{p}: row 2"), ("folder", "{p}: row 2"), ("csv", "{p}:3")],
)
def test_every_container_names_the_record(tmp_path, kind, location):
    path = write(tmp_path, kind, [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": None}])
    raises(location + ": field 'output': missing", path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[{"prompt": "p", "answer": "a"}, {"prompt": "p", "prompt": "q"}]',
            "{p}: record 2: field 'prompt' is given twice",
        ),
        (
            '[{"prompt": "p", "answer": "a"},\n {"prompt": }]',
            "{p}: record 2: invalid JSON: Expecting value (line 2, column 13)",
        ),
        (
            '[{"prompt": "p", "answer": "a"}\n {"prompt": "q"}]',
            "{p}: after record 1: invalid JSON: expected ',' or ']' (line 2, column 2)",
        ),
        ('[{"prompt": "p", "answer": "a"}, 3]', "{p}: record 2: expected a JSON object, got int"),
        ('[{"prompt": "p", "answer": "a"}] []', "{p}: invalid JSON: extra data after the array (line 1, column 34)"),
        ('[{"prompt": "p", "answer": "a"},]', "{p}: record 2: invalid JSON: Expecting value (line 1, column 33)"),
        ("[ ]", "{p}: no examples (an empty task)"),
        ("  \n", "{p}: no examples (an empty task)"),
        ("\f[]", '{p}: expected a JSON array of objects (or JSON Lines), got "\\f[]"'),
        ('"text"', '{p}: expected a JSON array of objects (or JSON Lines), got "\\"text\\""'),
        ("[" * 100000 + "]" * 100000, "{p}: record 1: invalid JSON: nested too deeply"),
    ],
)
def test_json_array_errors(tmp_path, text, message):
    path = tmp_path / "t.json"
    path.write_text(text, encoding="utf-8")
    raises(message, path)


def test_json_lines_errors_are_todays(tmp_path):
    path = tmp_path / "t.ndjson"
    for line, message in [
        ('{"prompt": "p", "answer": "a", "prompt": "q"}', "{p}:2: field 'prompt' is given twice"),
        ('{"prompt": ' + "[" * 100000 + "]" * 100000 + "}", "{p}:2: invalid JSON: nested too deeply"),
        ('{"prompt": "p", ', "{p}:2: invalid JSON: Expecting property name enclosed in double quotes (column 17)"),
        ("[1]", "{p}:2: expected a JSON object, got list"),
    ]:
        path.write_text('{"prompt": "p", "answer": "a"}\n' + line + "\n", encoding="utf-8")
        raises(message, path)
    path.write_bytes(b'{"prompt": "p", "answer": "a"}\n{"prompt": "\xe9"}\n')
    raises(
        "{p}:2: not UTF-8 text: 'utf-8' codec can't decode byte 0xe9 in position 12: invalid continuation byte", path
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prompt,answer,prompt\np,a,q\n", "{p}:1: column 'prompt' appears twice in the header"),
        ("prompt,answer\np,a,x\n", "{p}:2: 3 cells, but the header has 2 columns"),
        ("prompt,choices,gold\np,[a,0\n", "{p}:2: field 'choices': expected a JSON list in the cell, got \"[a\""),
        (
            'prompt,choices,gold\np,"[""a"", ""b""]",one\n',
            "{p}:2: field 'gold': expected an integer index into 'choices' (0..1), got \"one\"",
        ),
        ('prompt,answer\np,"a\n', "{p}:2: not valid CSV: unexpected end of data (a quoted cell is not closed)"),
        ('prompt,answer\np,"a"b\n', "{p}:2: not valid CSV: ',' expected after '\"'"),
        ("prompt,answer\n", "{p}: no examples (an empty task)"),
        ("", "{p}: no examples (an empty task)"),
    ],
)
def test_csv_errors(tmp_path, text, message):
    path = tmp_path / "t.csv"
    path.write_text(text, encoding="utf-8")
    raises(message, path, schema="rlora")


def test_parquet_and_folder_errors(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(DataError, match=r"^.*bad\.parquet: not a readable Parquet file: "):
        read(bad)
    import datasets

    splits = tmp_path / "splits"
    rows = datasets.Dataset.from_dict({"instruction": ["a"], "output": ["b"]})
    datasets.DatasetDict({"train": rows, "test": rows}).save_to_disk(str(splits))
    raises(
        "{p}: a DatasetDict (splits: train, test), not one dataset; save the split to read, e.g. "
        "dataset['train'].save_to_disk(...)",
        splits,
    )
    raises("{p} is a folder, but not one written by datasets' save_to_disk (it has no state.json)", tmp_path)


def test_unsupported_and_missing_files(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("x")
    raises(
        "{p}: unsupported kind of data file (.txt); expected .jsonl, .ndjson, .json, .csv, .parquet, or a "
        "folder written by datasets' save_to_disk",
        path,
    )
    raises("{p}: cannot read: No such file or directory", tmp_path / "nope.jsonl")


def test_reading_streams_the_good_lines_before_a_bad_one(tmp_path):
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [
            {"prompt": "p1", "answer": "a"},
            {"prompt": "p2", "answer": "a"},
            '{"prompt": ',
            {"prompt": "p4", "answer": "a"},
        ],
    )
    examples = iter_examples(DataFile(path))
    assert [next(examples).prompt, next(examples).prompt] == ["p1", "p2"]
    with pytest.raises(DataError, match=re.escape(f"{path}:3: invalid JSON")):
        next(examples)


# --- DataFile ---------------------------------------------------------------------------------------------------


def test_from_config_reads_a_path_or_a_mapping(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "a", "output": "b"}])
    monkeypatch.chdir(tmp_path)
    assert DataFile.from_config("t.jsonl", "cfg: data.files[0]") == DataFile(path.resolve())
    assert DataFile.from_config(
        {"path": "t.jsonl", "schema": "alpaca", "task": "x", "columns": {"output": "response"}}, "w"
    ) == DataFile(path.resolve(), "alpaca", "x", (("output", "response"),))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert DataFile.from_config("~/t.jsonl", "w").path == path.resolve()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            {"path": "t.jsonl", "schema": "x"},
            "w: schema: expected one of auto, rlora, alpaca, sharegpt, messages, got 'x'",
        ),
        ({"path": "t.jsonl", "scheme": "x"}, "w: unknown key 'scheme'; valid keys: path, schema, task, columns"),
        ({"schema": "alpaca"}, "w: path: missing (the data file or folder)"),
        ({"path": 3}, "w: path: expected a file path, got 3"),
        ("nope.jsonl", "w: no such file: nope.jsonl"),
        (["t.jsonl"], 'w: expected a file path or a mapping with keys path, schema, task, columns, got ["t.jsonl"]'),
        ({"path": "t.jsonl", "task": ""}, 'w: task: expected a non-empty string (the task\'s name), got ""'),
        (
            {"path": "t.jsonl", "columns": ["a"]},
            "w: columns: expected a mapping of rlora's field name to the file's column name, got [\"a\"]",
        ),
        (
            {"path": "t.jsonl", "columns": {"outptu": "r"}},
            "w: columns: unknown field 'outptu'; rlora's fields: answer, "
            "choices, conversations, format, gold, history, id, input, instruction, labels, messages, output, prompt, "
            "system, task",
        ),
        (
            {"path": "t.jsonl", "schema": "rlora", "columns": {"output": "r"}},
            "w: columns: unknown field 'output'; the "
            "rlora schema's fields: answer, choices, format, gold, id, labels, prompt, task",
        ),
        (
            {"path": "t.jsonl", "columns": {"output": ""}},
            'w: columns: output: expected the file\'s column name (a non-empty string), got ""',
        ),
        (
            {"path": "t.jsonl", "columns": {"output": "r", "input": "r"}},
            "w: columns: column 'r' is given for both 'output' and 'input'",
        ),
        (
            "t.txt",
            "w: t.txt: unsupported kind of data file (.txt); expected .jsonl, .ndjson, .json, .csv, "
            ".parquet, or a folder written by datasets' save_to_disk",
        ),
        (".", "w: . is a folder, but not one written by datasets' save_to_disk (it has no state.json)"),
    ],
)
def test_from_config_errors_name_the_entry_and_key(tmp_path, monkeypatch, value, message):
    write_jsonl(tmp_path / "t.jsonl", [{"instruction": "a", "output": "b"}])
    (tmp_path / "t.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as raised:
        DataFile.from_config(value, "w")
    assert str(raised.value) == message.replace("{tmp}", str(tmp_path.resolve()))


def test_settings_are_checked_when_made_in_python():
    with pytest.raises(DataError, match=r"^x\.jsonl: schema: expected one of auto, rlora, alpaca, sharegpt, messages"):
        DataFile(Path("x.jsonl"), schema="chatml")
    assert DataFile("x.jsonl", columns={"output": "r"}) == DataFile(Path("x.jsonl"), columns=(("output", "r"),))
    assert SCHEMAS == ("auto", "rlora", "alpaca", "sharegpt", "messages")


def test_fingerprint_follows_the_file_and_the_settings(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "a", "output": "b"}])
    spec = DataFile(path)
    first = spec.fingerprint()
    assert re.fullmatch(r"[0-9a-f]{64}", first) and DataFile(path).fingerprint() == first
    assert DataFile(path, schema="alpaca").fingerprint() != first
    assert DataFile(path, task="x").fingerprint() != first
    assert DataFile(path, columns=(("output", "r"),)).fingerprint() != first
    write_jsonl(path, [{"instruction": "a", "output": "c"}])  # same size
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    second = spec.fingerprint()
    assert second != first
    write_jsonl(path, [{"instruction": "a", "output": "longer"}])
    assert spec.fingerprint() not in (first, second)


def test_fingerprint_of_a_folder_follows_its_files(tmp_path):
    path = write_folder(tmp_path / "d", [{"instruction": "a", "output": "b"}])
    first = DataFile(path).fingerprint()
    write_folder(tmp_path / "d", [{"instruction": "a", "output": "a longer answer"}])
    assert DataFile(path).fingerprint() != first
    with pytest.raises(DataError, match="nope: cannot read"):
        DataFile(tmp_path / "nope").fingerprint()
