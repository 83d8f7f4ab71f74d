"""A whole operator scenario through a client generated from the CSMS's OpenAPI document.

Generate the client first (see README.md here, or docs/api.md), then::

    python scenario.py http://127.0.0.1:8080/api/v1 "$TOKEN" CP-1 TAG-1

registers station CP-1 and id tag TAG-1, asks the station (once it is connected and booted) to start
charging for TAG-1, and lists the station's transactions. tests/test_generated_client.py runs these
functions against a live CSMS with a test station.
"""
from __future__ import annotations

import sys

from csms_client import AuthenticatedClient
from csms_client.api.commands import remote_start
from csms_client.api.id_tags import create_id_tag
from csms_client.api.stations import create_station, get_station
from csms_client.api.transactions import list_transactions
from csms_client.models import CreateIdTagBody, CreateStationBody, Error, RemoteStartBody


def connect(base_url: str, token: str) -> AuthenticatedClient:
    return AuthenticatedClient(base_url=base_url, token=token, raise_on_unexpected_status=True)


def register(client: AuthenticatedClient, station_id: str, id_tag: str):
    """The station and the id tag, as the CSMS stored them (typed models: Station, IdTag)."""
    station = create_station.sync(client=client, body=CreateStationBody(id=station_id))
    tag = create_id_tag.sync(client=client, body=CreateIdTagBody(id_tag=id_tag))
    for answer in (station, tag):
        if isinstance(answer, Error):
            raise RuntimeError(answer.error.message)
    return station, tag


def is_online(client: AuthenticatedClient, station_id: str) -> bool:
    return get_station.sync(client=client, station_id=station_id).online


def start_charging(client: AuthenticatedClient, station_id: str, id_tag: str, connector_id: int = 1) -> str:
    """RemoteStartTransaction through the CSMS: the station's answer (Accepted or Rejected)."""
    answer = remote_start.sync(client=client, station_id=station_id,
                               body=RemoteStartBody(id_tag=id_tag, connector_id=connector_id))
    if isinstance(answer, Error):
        raise RuntimeError(f"{answer.error.code}: {answer.error.message}")
    return answer.status.value


def transactions_of(client: AuthenticatedClient, station_id: str):
    """The station's transactions, newest first (TransactionSummary models)."""
    return list_transactions.sync(client=client, station_id=station_id).items


def main(base_url: str, token: str, station_id: str, id_tag: str) -> None:
    client = connect(base_url, token)
    register(client, station_id, id_tag)
    print(f"registered {station_id} and {id_tag}; waiting for the station to connect and boot")
    input("press Enter once the station is online ")
    print("remote start:", start_charging(client, station_id, id_tag))
    input("press Enter once the station has started its transaction ")
    for transaction in transactions_of(client, station_id):
        print(transaction.transaction_id, transaction.id_tag, transaction.started_at, transaction.active)


if __name__ == "__main__":
    main(*sys.argv[1:5])
