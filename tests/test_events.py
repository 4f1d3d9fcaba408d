"""The event contract (store/events.py): what is accepted, what is rejected and why."""

from __future__ import annotations

import hashlib
import json

import pytest

from store.events import (
    ACTIONS, MAX_ID_CHARS, MAX_PAYLOAD_BYTES, MAX_TEXT_CHARS, MAX_TS_MS, EventError, Interaction, Item,
    dead_letter_record, parse_interaction, parse_interaction_fields, parse_item, to_json_bytes,
)

GOOD = {"user_id": "196", "item_id": "242", "ts": 881250949000}
GOOD_ITEM = {"item_id": "242", "text": "Kolya (1996) | Comedy"}


def reject(parse, payload) -> EventError:
    with pytest.raises(EventError) as info:
        parse(payload)
    assert info.value.detail.strip()
    return info.value


def with_(base: dict, **changes) -> dict:
    return {k: v for k, v in (base | changes).items() if v is not ...}


# --- accepted -------------------------------------------------------------------------------------
def test_interaction_defaults_and_numeric_ids():
    event = parse_interaction(json.dumps({"user_id": 196, "item_id": 242, "ts": 0}).encode())
    assert (event.user_id, event.item_id, event.ts) == ("196", "242", 0)
    assert event.action == "click" and event.event_id is None
    assert parse_interaction(with_(GOOD, event_id=7)).event_id == "7"


@pytest.mark.parametrize("action", sorted(ACTIONS))
def test_every_known_action_is_accepted(action):
    assert parse_interaction(with_(GOOD, action=action)).action == action


def test_boundaries_are_inclusive():
    assert parse_interaction(with_(GOOD, ts=MAX_TS_MS)).ts == MAX_TS_MS
    long_id = "u" * MAX_ID_CHARS
    assert parse_interaction(with_(GOOD, user_id=long_id)).user_id == long_id
    assert len(parse_item(with_(GOOD_ITEM, text="t" * MAX_TEXT_CHARS)).text) == MAX_TEXT_CHARS


def test_extra_fields_are_ignored():
    event = parse_interaction(with_(GOOD, rating=5, nested={"a": [1, 2]}))
    assert not hasattr(event, "rating")
    assert json.loads(to_json_bytes(event)) == GOOD | {"action": "click", "event_id": None}


def test_item_defaults_and_optional_fields():
    item = parse_item(GOOD_ITEM)
    assert (item.category, item.ts) == (None, None)
    item = parse_item(with_(GOOD_ITEM, item_id=242, category="Comedy", ts=5, ts_extra="x"))
    assert (item.item_id, item.category, item.ts) == ("242", "Comedy", 5)
    assert parse_item(with_(GOOD_ITEM, category=None, ts=None)).ts is None


def test_unicode_and_str_input_round_trip():
    item = parse_item('{"item_id": "é", "text": "Amélie \\ud83d\\ude00 東京"}')
    assert item.text == "Amélie 😀 東京"
    assert parse_item(to_json_bytes(item)) == item
    assert parse_interaction(to_json_bytes(parse_interaction(GOOD))) == parse_interaction(GOOD)


def test_events_are_frozen():
    event = parse_interaction(GOOD)
    with pytest.raises(Exception):
        event.user_id = "other"  # type: ignore[misc]
    assert isinstance(event, Interaction) and isinstance(parse_item(GOOD_ITEM), Item)


# --- rejected fields ------------------------------------------------------------------------------
INTERACTION_REJECTED = [
    ({"user_id": ...}, "user_id"),
    ({"item_id": ...}, "item_id"),
    ({"ts": ...}, "ts"),
    ({"user_id": None}, "user_id"),
    ({"user_id": True}, "user_id"),
    ({"item_id": False}, "item_id"),
    ({"user_id": 1.5}, "user_id"),
    ({"user_id": ["1"]}, "user_id"),
    ({"user_id": {"id": 1}}, "user_id"),
    ({"user_id": ""}, "user_id"),
    ({"item_id": "i" * (MAX_ID_CHARS + 1)}, "item_id"),
    ({"user_id": 10 ** MAX_ID_CHARS}, "user_id"),  # 257 digits as a string
    ({"user_id": "\ud800"}, "user_id"),  # lone surrogate: cannot be written as UTF-8 later
    ({"event_id": ""}, "event_id"),
    ({"event_id": True}, "event_id"),
    ({"ts": -1}, "ts"),
    ({"ts": MAX_TS_MS + 1}, "ts"),
    ({"ts": 881250949000 * 1000}, "ts"),  # microseconds: a unit mistake
    ({"ts": 2**64}, "ts"),
    ({"ts": 1.5}, "ts"),
    ({"ts": 881250949000.0}, "ts"),
    ({"ts": "881250949000"}, "ts"),
    ({"ts": True}, "ts"),
    ({"ts": None}, "ts"),
    ({"action": "buy"}, "action"),
    ({"action": "CLICK"}, "action"),
    ({"action": None}, "action"),
    ({"action": 1}, "action"),
]


@pytest.mark.parametrize("changes, field", INTERACTION_REJECTED)
def test_interaction_field_rejected(changes, field):
    error = reject(parse_interaction, with_(GOOD, **changes))
    assert error.reason == "invalid_fields"
    assert field in error.fields
    assert field in error.detail


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"item_id": ...}, "item_id"),
        ({"text": ...}, "text"),
        ({"text": None}, "text"),
        ({"text": 5}, "text"),
        ({"text": "t" * (MAX_TEXT_CHARS + 1)}, "text"),
        ({"text": "a\udc00b"}, "text"),
        ({"item_id": True}, "item_id"),
        ({"item_id": ""}, "item_id"),
        ({"category": 3}, "category"),
        ({"category": "c" * (MAX_ID_CHARS + 1)}, "category"),
        ({"ts": -5}, "ts"),
        ({"ts": "5"}, "ts"),
        ({"ts": 5.0}, "ts"),
    ],
)
def test_item_field_rejected(changes, field):
    error = reject(parse_item, with_(GOOD_ITEM, **changes))
    assert error.reason == "invalid_fields"
    assert field in error.fields


def test_every_bad_field_is_named():
    error = reject(parse_interaction, {"user_id": True, "ts": "x"})
    assert set(error.fields) == {"user_id", "item_id", "ts"}
    assert error.as_dict()["fields"] == list(error.fields)


# --- malformed payloads ---------------------------------------------------------------------------
MALFORMED = [
    (b"", "empty"),
    ("", "empty"),
    (b"   \n\t ", "empty"),
    ("  ", "empty"),
    (b"\xff\xfe{}", "bad_encoding"),
    (b'{"user_id": "caf\xe9"}', "bad_encoding"),  # Latin-1, not UTF-8
    (b"\xed\xa0\x80", "bad_encoding"),  # an encoded surrogate is not UTF-8 either
    (b"x" * (MAX_PAYLOAD_BYTES + 1), "too_large"),
    (b'{"user_id": "' + b"a" * MAX_PAYLOAD_BYTES + b'"}', "too_large"),
    ("y" * (MAX_PAYLOAD_BYTES + 1), "too_large"),
    (b"{", "invalid_json"),
    (b"not json", "invalid_json"),
    (b"{'user_id': 1}", "invalid_json"),  # Python repr, not JSON
    (b'{"user_id": 1,}', "invalid_json"),
    (b'{"user_id": 1} trailing', "invalid_json"),
    (b'{"user_id": 1' + b"0" * 5000 + b"}", "invalid_json"),  # int over Python's 4300-digit limit
    (b"[" * 100_000 + b"]" * 100_000, "invalid_json"),  # deeper than the parser's recursion limit
    (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "invalid_json"),
    (b"[]", "not_an_object"),
    (b'[{"user_id": 1, "item_id": 2, "ts": 3}]', "not_an_object"),
    (b"42", "not_an_object"),
    (b"null", "not_an_object"),
    (b'"a string"', "not_an_object"),
    (b"true", "not_an_object"),
    (b"{}", "invalid_fields"),
    (b'{"user_id": 1, "item_id": 2, "ts": NaN}', "invalid_fields"),
    (b'{"user_id": 1, "item_id": 2, "ts": 1e400}', "invalid_fields"),
]


@pytest.mark.parametrize("payload, reason", MALFORMED, ids=[f"{i}-{r}" for i, (_, r) in enumerate(MALFORMED)])
def test_malformed_payload(payload, reason):
    assert reject(parse_interaction, payload).reason == reason
    assert reject(parse_item, payload).reason == reason


ACCEPTED = [
    b'{"user_id": 196, "item_id": 242, "ts": 881250949000}',
    b' {"user_id":"196","item_id":"242","ts":881250949000,"x":[1,{"y":null}]}\n',
    b'{"user_id": "1", "item_id": "242", "ts": 0, "user_id": "196"}',  # the last duplicate key wins
    b'{"user_id": "caf\\u00e9 \xe2\x98\x95", "item_id": "242", "ts": 1, "action": "play", "event_id": 7}',
    b'{"user_id": "196", "item_id": "242", "ts": 1, "extra": NaN}',
]


@pytest.mark.parametrize("payload", ACCEPTED)
def test_the_native_json_path_gives_what_json_loads_does(payload):
    # parse_interaction reads bytes with pydantic's JSON parser; the reference is json.loads + validation.
    reference = Interaction.model_validate(json.loads(payload))
    assert Interaction.model_validate_json(payload) == reference  # the path taken: nothing fell back
    assert parse_interaction(payload) == reference


def test_nested_but_parseable_extra_field_is_ignored():
    payload = json.dumps(GOOD | {"deep": [[[[[[[[1]]]]]]]] * 3}).encode()
    assert parse_interaction(payload).user_id == "196"


def test_event_error_message_carries_reason_and_detail():
    error = reject(parse_interaction, b"[]")
    assert str(error).startswith("not_an_object: ")
    assert error.as_dict() == {"reason": "not_an_object", "detail": error.detail, "fields": []}


# --- dead letters ---------------------------------------------------------------------------------
def test_dead_letter_keeps_non_utf8_payload_losslessly():
    raw = b'{"user_id": "\xff\x00\xfe"}'
    error = reject(parse_interaction, raw)
    record = dead_letter_record(raw, error, topic="interactions", partition=3, offset=12345)
    assert record["payload_encoding"] == "hex"
    assert bytes.fromhex(record["payload"]) == raw
    assert record["source"] == {"topic": "interactions", "partition": 3, "offset": 12345}
    assert record["reason"] == "bad_encoding" and record["detail"] == error.detail
    json.dumps(record)  # the dead-letter body must itself be JSON


def test_dead_letter_keeps_utf8_payload_as_text():
    raw = '{"user_id": "Zoë", "ts": "soon"}'.encode()
    error = reject(parse_interaction, raw)
    record = dead_letter_record(raw, error, topic="interactions", partition=0, offset=0)
    assert record["payload_encoding"] == "utf-8"
    assert record["payload"].encode("utf-8") == raw
    assert record["reason"] == "invalid_fields"
    assert set(record["fields"]) == {"item_id", "ts"}


def test_dead_letter_without_position():
    error = reject(parse_item, "[]")
    record = dead_letter_record("[]", error, topic="items")
    assert record["source"] == {"topic": "items", "partition": None, "offset": None}
    assert record["payload"] == "[]"


def test_dead_letter_record_of_a_huge_payload_stays_small_and_identifies_it():
    raw = b'{"user_id": "u1", "pad": "x' + "é".encode() * (1 << 20) + b'"}'
    error = reject(parse_interaction, raw)
    assert error.reason == "too_large"
    record = dead_letter_record(raw, error, topic="interactions", partition=1, offset=7)
    assert record["payload_truncated"] is True
    assert record["payload_bytes"] == len(raw)
    assert record["payload_sha256"] == hashlib.sha256(raw).hexdigest()
    assert record["payload_encoding"] == "utf-8"  # the cut fell inside a 2-byte character
    assert raw.startswith(record["payload"].encode("utf-8"))
    assert len(json.dumps(record).encode()) < 1_000_000  # fits the broker's default message limit


# --- the ingest path's dict form --------------------------------------------------------------------
WELL_FORMED = [json.dumps(GOOD).encode(), json.dumps(GOOD | {"action": "play", "event_id": "e1"}).encode(),
               json.dumps(GOOD | {"event_id": None, "x": 1}).encode()]


@pytest.mark.parametrize("payload", ACCEPTED + WELL_FORMED)
def test_the_fields_path_accepts_what_the_model_accepts(payload):
    assert parse_interaction_fields(payload) == parse_interaction(payload).model_dump()


def test_well_formed_payloads_take_the_native_path_alone(monkeypatch):
    def no_fallback(raw):
        raise AssertionError(f"{raw!r} fell back to parse_interaction")

    monkeypatch.setattr("store.events.parse_interaction", no_fallback)
    assert [parse_interaction_fields(p)["user_id"] for p in WELL_FORMED] == ["196"] * len(WELL_FORMED)


@pytest.mark.parametrize("changes, field", INTERACTION_REJECTED)
def test_the_fields_path_rejects_what_the_model_rejects(changes, field):
    payload = json.dumps(with_(GOOD, **changes)).encode()
    assert reject(parse_interaction_fields, payload).as_dict() == reject(parse_interaction, payload).as_dict()


@pytest.mark.parametrize("payload, reason", [(p, r) for p, r in MALFORMED if isinstance(p, bytes)])
def test_the_fields_path_names_the_same_reason(payload, reason):
    assert reject(parse_interaction_fields, payload).reason == reason
