"""Where a webhook may be sent (SSRF): http(s) URLs whose host resolves to public addresses only.

A receiver's address is checked when the subscription is made and again at every connection, after
DNS resolution, and the connection goes to the address that was checked: a name that resolves to a
public address when subscribed and to 127.0.0.1 later (DNS rebinding) is refused then too. The
operator allows private networks (a receiver on the LAN, the tests' loopback one) explicitly.
"""
from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import IResolutionReceiver, IStreamClientEndpoint
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from csms.config import ConfigError

SCHEMES = ("http", "https")
MAX_URL_LENGTH = 2048


class ReceiverRefused(Exception):
    """A receiver URL that may not be used: ``code`` names why (for the API), the message says it."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def parse_networks(text: str, setting: str) -> tuple:
    """``[plugin:webhooks] allow_private_networks``: comma-separated addresses or CIDR networks."""
    networks = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(f"[plugin:webhooks] {setting}: {item!r} is not an IP address or network "
                              "(e.g. 127.0.0.0/8, ::1, 10.0.0.0/8)") from None
    return tuple(networks)


class AddressPolicy:
    """Public addresses are allowed; any other (private, loopback, link-local, multicast, unspecified,
    reserved, shared) only inside the networks the operator allows."""

    def __init__(self, allowed_networks: tuple = ()):
        self.allowed_networks = allowed_networks

    def refusal(self, host: str) -> str | None:
        """None when ``host`` (an IP address) may be used, else what kind of address it is."""
        address = ipaddress.ip_address(host.split("%", 1)[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in network for network in self.allowed_networks):
            return None
        for kind in ("loopback", "link_local", "multicast", "unspecified", "private", "reserved"):
            if getattr(address, f"is_{kind}"):
                return kind.replace("_", "-")
        if not address.is_global:
            return "non-global"
        return None


def check_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a receiver URL, or ReceiverRefused."""
    if len(url) > MAX_URL_LENGTH:
        raise ReceiverRefused("invalid_url", f"the URL is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ReceiverRefused("invalid_url", f"the URL cannot be parsed: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ReceiverRefused("invalid_url", "only http:// and https:// receivers are supported")
    if not parts.hostname:
        raise ReceiverRefused("invalid_url", "the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise ReceiverRefused("invalid_url", "credentials in the URL are not supported: receivers check the "
                                             "signature instead")
    if any(c.isspace() for c in url):
        raise ReceiverRefused("invalid_url", "the URL contains white space")
    return scheme, parts.hostname, port or (443 if scheme == "https" else 80)


@implementer(IResolutionReceiver)
class _Collect:
    def __init__(self):
        self.addresses: list[str] = []
        self.done = defer.Deferred()

    def resolutionBegan(self, resolution):
        pass

    def addressResolved(self, address):
        self.addresses.append(address.host)

    def resolutionComplete(self):
        self.done.callback(self.addresses)


def resolve(resolver, host: str, port: int) -> defer.Deferred:
    """Fires with every address ``host`` resolves to (IPv4 and IPv6), through an IHostnameResolver."""
    collect = _Collect()
    resolver.resolveHostName(collect, host, port)
    return collect.done


class ReceiverGuard:
    """Resolves receivers and keeps only the addresses the policy allows."""

    def __init__(self, policy: AddressPolicy, resolver):
        self.policy = policy
        self.resolver = resolver

    @defer.inlineCallbacks
    def allowed_addresses(self, host: str, port: int):
        """Fires with the allowed addresses of ``host``; fails with ReceiverRefused when it has none."""
        addresses = yield resolve(self.resolver, host, port)
        if not addresses:
            raise ReceiverRefused("unresolvable_host", f"{host!r} does not resolve to any address")
        refused = {address: self.policy.refusal(address) for address in addresses}
        bad = {address: why for address, why in refused.items() if why is not None}
        if bad:
            # One bad address refuses the receiver: which address a client picks is not ours to choose.
            listed = ", ".join(f"{address} ({why})" for address, why in sorted(bad.items()))
            raise ReceiverRefused("receiver_address_refused",
                                  f"{host!r} resolves to {listed}: not allowed unless [plugin:webhooks] "
                                  "allow_private_networks includes it")
        return addresses


@implementer(IStreamClientEndpoint)
class _CheckedEndpoint:
    """Resolves, checks, then connects to the checked address (never resolving again)."""

    def __init__(self, reactor, guard: ReceiverGuard, scheme: str, host: str, port: int, timeout: float):
        self.reactor, self.guard = reactor, guard
        self.scheme, self.host, self.port, self.timeout = scheme, host, port, timeout

    def connect(self, factory):
        def connect_to(addresses):
            address = addresses[0]
            kind = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
            endpoint = kind(self.reactor, address, self.port, timeout=self.timeout)
            if self.scheme == "https":
                # Certificate and SNI checked against the URL's host name, not the address.
                creator = BrowserLikePolicyForHTTPS().creatorForNetloc(self.host.encode("idna"), self.port)
                endpoint = wrapClientTLS(creator, endpoint)
            return endpoint.connect(factory)

        def refused(failure):
            failure.trap(DNSLookupError)
            raise ReceiverRefused("unresolvable_host", f"{self.host!r} does not resolve: {failure.value}")
        return self.guard.allowed_addresses(self.host, self.port).addErrback(refused).addCallback(connect_to)


@implementer(IAgentEndpointFactory)
class CheckedEndpointFactory:
    """For :class:`twisted.web.client.Agent`: every connection goes through the guard."""

    def __init__(self, reactor, guard: ReceiverGuard, connect_timeout: float):
        self.reactor, self.guard, self.connect_timeout = reactor, guard, connect_timeout

    def endpointForURI(self, uri):
        return _CheckedEndpoint(self.reactor, self.guard, uri.scheme.decode("ascii"),
                                uri.host.decode("idna"), uri.port, self.connect_timeout)
