"""CiliumIdentity objects and the allocator's store of CRD mode.

The objects (name = the number, ``security-labels`` = the label set), the API
calls CRD mode makes, and ``CRDIdentityStore``: create with conflict
detection (201 ours; 409 read: same labels ours, other labels next number)
and the GC mark taken back when this node starts using an identity. The
design, the watch and the collector: ``_identityk8s``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, Protocol

from axoneme.agent._k8sinformer import Obj, short_error
from axoneme.core.errors import IdentityError
from axoneme.core.identity import MAX_CLUSTER_IDENTITY, MIN_CLUSTER_IDENTITY
from axoneme.core.labels import SOURCE_K8S, Labels, valid_label_key, valid_label_value

LOG = logging.getLogger(__name__)


GROUP, VERSION, PLURAL, KIND = "cilium.io", "v2", "ciliumidentities", "CiliumIdentity"
LABELS_FIELD = "security-labels"
MARK = "io.cilium.heartbeat"  # Cilium's: "marked for deletion at" (RFC 3339)
WRITE_TIMEOUT = (3, 10)


def identity_object(number: int, strings: Iterable[str]) -> Obj:
    """The CiliumIdentity of a number and its labels."""
    security: dict[str, str] = {}
    meta_labels: dict[str, str] = {}
    for text in strings:
        key, _, value = text.partition("=")
        security[key] = value
        source, _, name = key.partition(":")
        if source == SOURCE_K8S and valid_label_key(name) and valid_label_value(value):
            meta_labels[name] = value
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
            "metadata": {"name": str(number), "labels": meta_labels},
            LABELS_FIELD: security}


def object_number(obj: Obj) -> int | None:
    """The number an object names, None when its name is not a cluster identity."""
    name = str((obj.get("metadata") or {}).get("name") or "")
    if not name.isdigit() or len(name) > 6:
        return None
    number = int(name)
    return number if MIN_CLUSTER_IDENTITY <= number <= MAX_CLUSTER_IDENTITY else None


def object_labels(obj: Obj) -> list[str]:
    """The sorted label strings of an object's ``security-labels``."""
    security = obj.get(LABELS_FIELD)
    if not isinstance(security, Mapping):
        return []
    return Labels.from_strings(f"{k}={v}" if v else str(k)
                               for k, v in security.items()).sorted_strings()


def marked_at(obj: Obj) -> float | None:
    """When the collector marked an object unused (epoch seconds), None if not."""
    text = ((obj.get("metadata") or {}).get("annotations") or {}).get(MARK)
    if not text:
        return None
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0  # unreadable: as old as can be (Cilium only checks it is there)


def meta_field(obj: Obj, field: str) -> str:
    return str((obj.get("metadata") or {}).get(field) or "")


def http_status(e: BaseException) -> int | None:
    status = getattr(e, "status", None)
    return status if isinstance(status, int) else None


class IdentityAPI(Protocol):
    """The API calls of CRD mode (``KubernetesIdentityAPI``; a fake in unit tests).
    Errors carry the HTTP status as ``.status`` (the client's ApiException)."""

    def create(self, obj: Obj) -> Obj: ...

    def get(self, number: int) -> Obj | None: ...

    def set_mark(self, number: int, resource_version: str, value: str | None) -> Obj: ...

    def delete(self, number: int, uid: str, resource_version: str) -> None: ...


class KubernetesIdentityAPI:
    """``IdentityAPI`` over the `kubernetes` client's CustomObjectsApi."""

    def __init__(self, api: Any) -> None:
        from kubernetes import client

        self.custom: Any = client.CustomObjectsApi(api)
        self.v1: Any = client

    def lister(self) -> Callable[..., Any]:
        def call(**kwargs: Any) -> Any:
            return self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, **kwargs)
        call.__doc__ = ":rtype: object"  # raw dicts, as the other custom listers
        return call

    def create(self, obj: Obj) -> Obj:
        return dict(self.custom.create_cluster_custom_object(
            GROUP, VERSION, PLURAL, obj, _request_timeout=WRITE_TIMEOUT))

    def get(self, number: int) -> Obj | None:
        try:
            return dict(self.custom.get_cluster_custom_object(
                GROUP, VERSION, PLURAL, str(number), _request_timeout=WRITE_TIMEOUT))
        except Exception as e:
            if http_status(e) == 404:
                return None
            raise

    def set_mark(self, number: int, resource_version: str, value: str | None) -> Obj:
        # a merge patch carrying metadata.resourceVersion is conditional: 409 if changed
        body = {"metadata": {"resourceVersion": resource_version,
                             "annotations": {MARK: value}}}
        return dict(self.custom.patch_cluster_custom_object(
            GROUP, VERSION, PLURAL, str(number), body,
            _content_type="application/merge-patch+json", _request_timeout=WRITE_TIMEOUT))

    def delete(self, number: int, uid: str, resource_version: str) -> None:
        body = self.v1.V1DeleteOptions(preconditions=self.v1.V1Preconditions(
            uid=uid, resource_version=resource_version))
        self.custom.delete_cluster_custom_object(GROUP, VERSION, PLURAL, str(number),
                                                 body=body, _request_timeout=WRITE_TIMEOUT)


class CRDIdentityStore:
    """The allocator's ``IdentityStore`` in CRD mode (steps 1-2 of the module
    docstring). ``objects`` is the watch's view: number -> CiliumIdentity."""

    def __init__(self, api: IdentityAPI | None = None) -> None:
        self.api = api
        self.objects: dict[int, Obj] = {}
        self.created = 0
        self.errors = 0
        self.last_error = ""

    def load(self) -> Mapping[int, list[str]]:
        return {}  # the watch's first list brings them (IdentitySync)

    def _api(self) -> IdentityAPI:
        if self.api is None:
            raise IdentityError("cluster identities: not connected to the API server yet")
        return self.api

    def _failed(self, what: str, e: BaseException) -> IdentityError:
        self.errors += 1
        hint = (" (is deploy/crds/ciliumidentities.yaml applied? or set "
                "identity_allocation_mode: local)" if http_status(e) == 404 else "")
        self.last_error = f"{what}: {short_error(e)}{hint}"
        LOG.warning("cluster identities: %s", self.last_error)
        return IdentityError(f"cluster identity {self.last_error}")

    def claim(self, number: int, labels: list[str]) -> bool:
        """Create ``number`` for ``labels``: True when it is theirs (created now,
        or by another node for the same labels), False when other labels hold it."""
        api = self._api()
        want = sorted(labels)
        for _ in range(3):  # a 409 whose object is gone when read: create again
            try:
                obj = api.create(identity_object(number, want))
                self.objects[number] = obj
                self.created += 1
                LOG.info("identity %d created for %s", number, ",".join(want))
                return True
            except Exception as e:
                if http_status(e) != 409:
                    raise self._failed(f"{number}: create", e) from e
            try:
                current = api.get(number)
            except Exception as e:
                raise self._failed(f"{number}: get", e) from e
            if current is None:
                continue
            self.objects[number] = current
            if object_labels(current) != want:
                return False
            self._unmark(api, number, want, current)
            return True
        raise IdentityError(f"cluster identity {number}: created and deleted under us; "
                            f"try again")

    def acquire(self, number: int, labels: list[str]) -> None:
        """This node starts using ``number``: take back a collector's mark (or
        create it again if it was deleted); IdentityError when the number now
        names other labels."""
        obj = self.objects.get(number)
        if obj is not None and marked_at(obj) is None:
            return  # not marked: nothing to take back
        api = self._api()
        if obj is None or not self._unmark(api, number, sorted(labels), obj):
            if not self.claim(number, labels):
                raise IdentityError(f"cluster identity {number} now names other labels")

    def _unmark(self, api: IdentityAPI, number: int, want: list[str], obj: Obj) -> bool:
        """Remove the collector's mark; False when the object is gone."""
        for _ in range(3):
            if marked_at(obj) is None:
                return True
            try:
                self.objects[number] = api.set_mark(number, meta_field(obj, "resourceVersion"), None)
                LOG.info("identity %d is used again: mark removed", number)
                return True
            except Exception as e:
                status = http_status(e)
                if status == 404:
                    return False
                if status != 409:
                    raise self._failed(f"{number}: unmark", e) from e
            try:
                current = api.get(number)
            except Exception as e:
                raise self._failed(f"{number}: get", e) from e
            if current is None or object_labels(current) != want:
                return False
            obj = current
        raise IdentityError(f"cluster identity {number}: its mark keeps changing; try again")

    def view(self) -> dict[str, Any]:
        return {"mode": "crd", "objects": len(self.objects), "created": self.created,
                "errors": self.errors, "last_error": self.last_error}
