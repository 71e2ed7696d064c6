"""Validation of the names that reach the agent from runtimes and users.

Kubernetes' own rules (k8s.io/apimachinery/pkg/util/validation):

1. a namespace is an RFC 1123 *label*: at most 63 characters, lower-case
   alphanumerics and '-', starting and ending with an alphanumeric;
2. a pod name is an RFC 1123 *subdomain*: at most 253 characters, labels as
   above joined by '.';

and the CNI specification's (SPEC.md, "Parameters"):

3. CNI_CONTAINERID starts with an alphanumeric, then alphanumerics, '_', '.'
   or '-' (the same syntax container runtimes give container names: podman
   passes its container name, e.g. ``elastic_meninsky``, as K8S_POD_NAME);
4. CNI_IFNAME is a Linux interface name: 1-15 bytes, no '/', ':' or
   whitespace, not '.' or '..'.

Each checker returns None when the name is valid, else why it is not: the
callers (the CNI plugin, the agent API) turn that into their own error.
"""

from __future__ import annotations

import re

__all__ = ["container_id_problem", "dns_label_problem", "dns_subdomain_problem",
           "ifname_problem", "pod_name_problem"]

_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_SHOWN = 64


def _shown(name: str) -> str:
    """``name`` quoted for a message, cut so a hostile value stays short."""
    return repr(name if len(name) <= _SHOWN else name[:_SHOWN] + "...")


def dns_label_problem(name: str) -> str | None:
    """Why ``name`` is not an RFC 1123 label (a Kubernetes namespace), or None."""
    if not isinstance(name, str) or not name:
        return "must not be empty"
    if len(name) > 63:
        return f"{_shown(name)} is longer than 63 characters"
    if not name.isascii() or not _LABEL.fullmatch(name):
        return (f"{_shown(name)} must consist of lower-case letters, digits and '-', "
                "and start and end with a letter or digit")
    return None


def dns_subdomain_problem(name: str) -> str | None:
    """Why ``name`` is not an RFC 1123 subdomain (a Kubernetes pod name), or None."""
    if not isinstance(name, str) or not name:
        return "must not be empty"
    if len(name) > 253:
        return f"{_shown(name)} is longer than 253 characters"
    if not name.isascii() or not all(_LABEL.fullmatch(part) for part in name.split(".")):
        return (f"{_shown(name)} must consist of lower-case letters, digits, '-' and '.', "
                "and start and end with a letter or digit")
    return None


def pod_name_problem(name: str) -> str | None:
    """Why ``name`` is neither a Kubernetes pod name (RFC 1123 subdomain) nor
    a container runtime's container name (rule 3, at most 253 characters), or
    None. CNI ADD takes either in K8S_POD_NAME: kubelet sends the pod's name,
    podman its container's name."""
    if dns_subdomain_problem(name) is None:
        return None
    if isinstance(name, str) and 0 < len(name) <= 253 and name.isascii() \
            and _CONTAINER_ID.fullmatch(name):
        return None
    if not isinstance(name, str) or not name:
        return "must not be empty"
    if len(name) > 253:
        return f"{_shown(name)} is longer than 253 characters"
    return (f"{_shown(name)} must be a pod name (lower-case letters, digits, '-' and '.') or "
            "a container name (letters, digits, '_', '.' and '-'), starting with a letter "
            "or digit")


def container_id_problem(cid: str) -> str | None:
    """Why ``cid`` is not a valid CNI_CONTAINERID, or None."""
    if not isinstance(cid, str) or not cid:
        return "must not be empty"
    if len(cid) > 1024:
        return f"{_shown(cid)} is longer than 1024 characters"
    if not cid.isascii() or not _CONTAINER_ID.fullmatch(cid):
        return (f"{_shown(cid)} must start with a letter or digit, followed by letters, "
                "digits, '_', '.' or '-'")
    return None


def ifname_problem(name: str) -> str | None:
    """Why ``name`` is not a valid Linux interface name (CNI_IFNAME), or None."""
    if not isinstance(name, str) or not name:
        return "must not be empty"
    if len(name.encode("utf-8", "surrogatepass")) > 15:
        return f"{_shown(name)} is longer than 15 bytes"
    if name in (".", "..") or any(c in name for c in "/:") or any(c.isspace() for c in name) \
            or not name.isprintable():
        return f"{_shown(name)} must not be '.', '..' or contain '/', ':' or whitespace"
    return None
