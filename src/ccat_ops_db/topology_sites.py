"""Topology: the ``[[sites]]`` entries, and how each site's machine is reached.

A site with no ``host`` shares a filesystem with the others (the embedded mode: every
site a folder under one data directory, transfers by ``copy``).  A site with a ``host``
is its own machine: other sites' workers reach it only over the network, by ssh (as
``ssh_user`` on ``ssh_port`` with the private key ``ssh_key``, a path on the pushing
worker's machine in which ssh expands ``%u`` to the local user) and by the network
methods it serves (``xrootd_url``: its XRootD server, ``root://host[:port]``)::

    [[sites]]
    name = "cologne"
    short_name = "cologne"
    host = "lta.cologne.example.org"
    ssh_user = "ccat-cologne"
    ssh_port = 22
    ssh_key = "/etc/ccat/keys/%u/id_ed25519"
    xrootd_url = "root://lta.cologne.example.org:1094"

A route into such a site must use a network method it serves (``rsync``/``bbcp`` over
its ssh, ``xrootd`` through its ``xrootd_url``; ``copy`` cannot reach another machine).
``rsync`` and ``bbcp`` also copy between folders of one filesystem, so they are allowed
into a site without ``host``; ``xrootd`` is not.
"""

from __future__ import annotations

import re
from typing import Any

from ccat_ops_db import models as m

NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
REACH_KEYS = ("host", "ssh_user", "ssh_port", "ssh_key", "xrootd_url")
SITE_KEYS = {"name", "short_name", "description", "active", *REACH_KEYS}
_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.\-]*[A-Za-z0-9])?$|^\[[0-9A-Fa-f:.]+\]$")
_USER_RE = re.compile(r"^[a-z_][a-z0-9_.\-]*\$?$")
_XROOTD_RE = re.compile(r"^roots?://([^/:\s]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?/*$")
# What of the destination site a method needs.  rsync and bbcp also copy between
# folders of one filesystem; xrootd only ever reaches a server.
NEEDS = {m.TransferMethod.XROOTD: "xrootd_url"}


def check_sites(sites: list[dict[str, Any]], problems: list[str]) -> None:
    """Append to ``problems`` what is wrong with each ``[[sites]]`` entry."""
    for i, site in enumerate(sites):
        what = f"site #{i + 1} ({site.get('name', '?')})"
        for key in site:
            if key not in SITE_KEYS:
                problems.append(f"{what}: unknown field '{key}'")
        for key in ("name", "short_name"):
            if site.get(key) in (None, ""):
                problems.append(f"{what}: missing required field '{key}'")
            elif not NAME_RE.match(str(site[key])):
                problems.append(
                    f"{what}: {key} {site[key]!r} must be lower case letters, digits and _"
                )
        _check_reach(site, what, problems)


def _check_reach(site: dict[str, Any], what: str, problems: list[str]) -> None:
    host = site.get("host")
    if host is None:
        for key in REACH_KEYS[1:]:
            if site.get(key) is not None:
                problems.append(f"{what}: '{key}' needs the site's 'host'")
        return
    if not isinstance(host, str) or not _HOST_RE.match(host):
        problems.append(f"{what}: host {host!r} is not a host name or IP address")
    user = site.get("ssh_user")
    if user is not None and (not isinstance(user, str) or not _USER_RE.match(user)):
        problems.append(f"{what}: ssh_user {user!r} is not a unix user name")
    port = site.get("ssh_port")
    if port is not None and (
        not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536
    ):
        problems.append(f"{what}: ssh_port must be an integer in 1..65535, got {port!r}")
    key = site.get("ssh_key")
    if key is not None and (not isinstance(key, str) or not key.startswith(("/", "~"))):
        problems.append(f"{what}: ssh_key must be an absolute path (or ~/...), got {key!r}")
    url = site.get("xrootd_url")
    if url is not None:
        match = _XROOTD_RE.match(url) if isinstance(url, str) else None
        if match is None:
            problems.append(f"{what}: xrootd_url must look like root://host[:port], got {url!r}")
        elif match.group(2) and not 0 < int(match.group(2)[1:]) < 65536:
            problems.append(f"{what}: xrootd_url port out of range in {url!r}")


def check_route_reach(
    route: dict[str, Any], sites_by_name: dict[str, dict[str, Any]], what: str, problems: list[str]
) -> None:
    """A route into a site with a ``host`` uses a network method that site serves."""
    dest = sites_by_name.get(route["destination"])
    method = route["transfer_method"]
    if dest is None or method is None:
        return
    name = route["destination"]
    needs = NEEDS.get(method)
    if dest.get("host") is None:
        if needs is not None:
            problems.append(
                f"{what}: method '{method.value}' needs site {name!r} to declare 'host' "
                f"and '{needs}'"
            )
        return
    if method == m.TransferMethod.COPY:
        problems.append(
            f"{what}: site {name!r} is its own host ({dest['host']}); 'copy' cannot reach "
            "it, use 'rsync', 'xrootd' or 'bbcp'"
        )
    elif needs is not None and dest.get(needs) is None:
        problems.append(f"{what}: method '{method.value}' needs site {name!r} to declare '{needs}'")


def reach_values(site: dict[str, Any]) -> dict[str, Any]:
    """The Site columns of one validated entry (None where not given)."""
    return {key: site.get(key) for key in REACH_KEYS}
