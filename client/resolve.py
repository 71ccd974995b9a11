"""One DNS name -> every server behind it.

A Kubernetes headless Service (clusterIP: None) answers a DNS query with one A record per ready pod.
gRPC keeps one long-lived HTTP/2 connection per channel, so a client that hands the name to gRPC
talks to whichever pod it first connected to; expanding the name into one "IP:PORT" endpoint per
address instead lets the client's own scheduler spread windows over every pod and retry a failed
window on another one.

A name that resolves to one address (or a literal IP) is kept as given, so nothing changes for a
plain "HOST:PORT" and TLS names stay names. Only one address family is used: a host listed with
both an IPv4 and an IPv6 address (localhost) is one server, not two.
"""

from __future__ import annotations

import ipaddress
import logging
import socket

from thfm_serve.errors import ThfmError

from .transport import normalize_url

logger = logging.getLogger(__name__)


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def resolve_url(url: str) -> list[str]:
    """'HOST:PORT' -> ['IP1:PORT', 'IP2:PORT', ...] when HOST has several addresses, else [url]."""
    url = normalize_url(url)
    host, _, port = url.rpartition(":")
    if _is_literal(host):
        return [url]
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ThfmError(f"--url {url}: cannot resolve {host!r} ({e.strerror or e})") from None
    by_family: dict[int, list[str]] = {}
    for family, _type, _proto, _name, sockaddr in infos:
        ip = sockaddr[0]
        addrs = by_family.setdefault(family, [])
        if ip not in addrs:
            addrs.append(ip)
    addrs = by_family.get(socket.AF_INET) or by_family.get(socket.AF_INET6) or []
    if len(addrs) <= 1:
        return [url]
    out = [f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip in sorted(addrs, key=ipaddress.ip_address)]
    logger.info("%s resolves to %d servers: %s", url, len(out), ", ".join(out))
    return out


def expand_urls(urls) -> list[str]:
    """Every URL resolved (resolve_url), duplicates dropped, order kept."""
    urls = [urls] if isinstance(urls, str) else list(urls or [])
    out: list[str] = []
    for u in urls:
        for e in resolve_url(u):
            if e not in out:
                out.append(e)
    return out
