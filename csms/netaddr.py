"""Client addresses checked against configured networks (``[metrics] allowed_networks``)."""
from __future__ import annotations

import ipaddress


def parse_networks(texts, setting: str) -> tuple:
    """The networks ``texts`` name (``127.0.0.0/8``, ``::1``, ``10.1.2.3``), or ConfigError naming ``setting``."""
    from csms.config import ConfigError

    networks = []
    for text in texts:
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ConfigError(f"{setting}: {text!r} is not an IP address or network (e.g. 127.0.0.0/8, ::1)") \
                from None
    return tuple(networks)


def address_in(host, networks) -> bool:
    """Whether the IP address ``host`` (text; an IPv4-mapped IPv6 address counts as its IPv4 address) is
    in one of ``networks``. Anything that is not an IP address (a UNIX socket's peer) is in none."""
    try:
        address = ipaddress.ip_address(host)
    except (TypeError, ValueError):
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    return any(address in network for network in networks)
