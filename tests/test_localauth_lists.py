"""The pure list arithmetic behind SendLocalList: idTagInfo, differentials, chunks and versions."""
from datetime import datetime, timezone

import pytest

from csms_plugins.localauth.lists import (changes, differential_entries, full_entries, id_tag_info, next_version,
                                     parse_limit, plan_requests)

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


def test_id_tag_info_follows_what_authorize_would_answer():
    assert id_tag_info({"id_tag": "A", "status": "Accepted"}, NOW) == {"status": "Accepted"}
    assert id_tag_info({"id_tag": "A", "status": "Accepted", "expiry_date": datetime(2024, 5, 1, 11, 59),
                        "parent_id_tag": "P"}, NOW) == {
        "status": "Expired", "expiryDate": "2024-05-01T11:59:00.000Z", "parentIdTag": "P"}
    assert id_tag_info({"id_tag": "A", "status": "Blocked",
                        "expiry_date": datetime(2025, 1, 1, tzinfo=timezone.utc)}, NOW) == {
        "status": "Blocked", "expiryDate": "2025-01-01T00:00:00.000Z"}


def test_full_entries_all_carry_id_tag_info_sorted():
    desired = {"B": {"status": "Blocked"}, "A": {"status": "Accepted"}}
    assert full_entries(desired) == [{"idTag": "A", "idTagInfo": {"status": "Accepted"}},
                                     {"idTag": "B", "idTagInfo": {"status": "Blocked"}}]


def test_differential_entries_added_changed_removed():
    acknowledged = {"KEEP": {"status": "Accepted"}, "CHANGE": {"status": "Accepted"},
                    "GONE": {"status": "Accepted"}, "REORDERED": {"status": "Accepted", "parentIdTag": "P"}}
    desired = {"KEEP": {"status": "Accepted"}, "CHANGE": {"status": "Blocked"}, "NEW": {"status": "Accepted"},
               "REORDERED": {"parentIdTag": "P", "status": "Accepted"}}
    assert changes(acknowledged, desired) == {"added": ["NEW"], "changed": ["CHANGE"], "removed": ["GONE"]}
    assert differential_entries(acknowledged, desired) == [
        {"idTag": "CHANGE", "idTagInfo": {"status": "Blocked"}},
        {"idTag": "GONE"},
        {"idTag": "NEW", "idTagInfo": {"status": "Accepted"}},
    ]
    assert differential_entries(desired, desired) == []


def test_plan_requests_chunks_a_full_list_into_full_then_differentials():
    entries = [{"idTag": str(i)} for i in range(5)]
    plan = plan_requests("Full", entries, 4, 2)
    assert [(p["listVersion"], p["updateType"], [e["idTag"] for e in p["localAuthorizationList"]]) for p in plan] == \
        [(4, "Full", ["0", "1"]), (5, "Differential", ["2", "3"]), (6, "Differential", ["4"])]
    assert plan_requests("Full", entries, 1, None) == [
        {"listVersion": 1, "updateType": "Full", "localAuthorizationList": entries}]
    assert plan_requests("Full", [], 3, 2) == [{"listVersion": 3, "updateType": "Full", "localAuthorizationList": []}]
    assert [p["updateType"] for p in plan_requests("Differential", entries, 1, 3)] == ["Differential"] * 2


def test_next_version_is_above_every_known_version():
    assert next_version(None, None, None) == 1
    assert next_version(3, 2, -1) == 4
    assert next_version(1, 1, 9) == 10


@pytest.mark.parametrize("raw, expected", [("20", 20), (" 5 ", 5), (7, 7), ("0", None), ("-1", None),
                                           ("many", None), (None, None), ("", None)])
def test_parse_limit(raw, expected):
    assert parse_limit(raw) == expected
