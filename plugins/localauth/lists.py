"""Pure list arithmetic for SendLocalList (OCPP 1.6 §5.14, §6.47): entries, differentials, chunks, versions.

No I/O here: the store and the plugin feed these functions plain dicts, which keeps the rules that
OCTT checks (TC_043_4: every Full entry has an idTagInfo; TC_043_5: a Differential carries exactly
the changes since the acknowledged version) testable on their own.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone

from csms.ocpp16 import format_datetime

FULL = "Full"
DIFFERENTIAL = "Differential"
UPDATE_TYPES = (FULL, DIFFERENTIAL)


def id_tag_info(tag: dict, now: datetime) -> dict:
    """The idTagInfo of an id tag as ``csms_id_tags`` returns it, judged as Authorize would judge it now."""
    status = tag["status"]
    expiry = tag.get("expiry_date")
    if expiry is not None and expiry.tzinfo is None:
        expiry = expiry.replace(tzinfo=timezone.utc)
    if status == "Accepted" and expiry is not None and expiry <= now:
        status = "Expired"
    info = {"status": status}
    if expiry is not None:
        info["expiryDate"] = format_datetime(expiry)
    if tag.get("parent_id_tag"):
        info["parentIdTag"] = tag["parent_id_tag"]
    return info


def canonical(info: dict) -> str:
    """The stored form of an idTagInfo: equal infos give equal text."""
    return json.dumps(info, sort_keys=True, separators=(",", ":"))


def desired_list(tags: list[dict], now: datetime) -> dict[str, dict]:
    """``{id_tag: idTagInfo}``: what the station's list should hold."""
    return {tag["id_tag"]: id_tag_info(tag, now) for tag in tags}


def full_entries(desired: dict[str, dict]) -> list[dict]:
    """Every entry of a Full update, sorted by id tag; each carries its idTagInfo (TC_043_4)."""
    return [{"idTag": id_tag, "idTagInfo": desired[id_tag]} for id_tag in sorted(desired)]


def changes(acknowledged: dict[str, dict], desired: dict[str, dict]) -> dict[str, list[str]]:
    """The id tags added, changed and removed since the acknowledged list, each sorted."""
    added = sorted(t for t in desired if t not in acknowledged)
    changed = sorted(t for t in desired if t in acknowledged and canonical(acknowledged[t]) != canonical(desired[t]))
    removed = sorted(t for t in acknowledged if t not in desired)
    return {"added": added, "changed": changed, "removed": removed}


def differential_entries(acknowledged: dict[str, dict], desired: dict[str, dict]) -> list[dict]:
    """The entries of a Differential update, sorted by id tag.

    Added and changed tags carry their new idTagInfo; a removed tag is an entry without idTagInfo,
    which tells the station to delete it (OCPP 1.6 §5.14).
    """
    diff = changes(acknowledged, desired)
    entries = [{"idTag": t, "idTagInfo": desired[t]} for t in diff["added"] + diff["changed"]]
    entries += [{"idTag": t} for t in diff["removed"]]
    return sorted(entries, key=lambda entry: entry["idTag"])


def next_version(*known: int | None) -> int:
    """One more than every version sent, acknowledged or read back: the list version only ever increases."""
    return max([0] + [v for v in known if v is not None]) + 1


def plan_requests(update_type: str, entries: list[dict], first_version: int, chunk_size: int | None) -> list[dict]:
    """SendLocalList.req payloads for ``entries``, at most ``chunk_size`` entries each.

    A Full list that does not fit in one request is sent as a Full first chunk followed by
    Differential chunks that add the rest; every request has its own, increasing, version.
    A Full update with no entries is one request that empties the station's list.
    """
    if not chunk_size or chunk_size < 1:
        chunk_size = max(1, len(entries))
    chunks = [entries[i:i + chunk_size] for i in range(0, len(entries), chunk_size)] or [[]]
    requests = []
    for index, chunk in enumerate(chunks):
        kind = update_type if index == 0 else DIFFERENTIAL
        requests.append({"listVersion": first_version + index, "updateType": kind,
                         "localAuthorizationList": chunk})
    return requests


def parse_limit(value) -> int | None:
    """A station's SendLocalListMaxLength / LocalAuthListMaxLength value, or None when unknown or unusable."""
    try:
        limit = int(str(value).strip())
    except (TypeError, ValueError):
        return None
    return limit if limit > 0 else None
