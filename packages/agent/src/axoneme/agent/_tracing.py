"""OpenTelemetry traces of the agent, exported over OTLP/HTTP when
``--otlp-endpoint URL`` (config key ``otlp_endpoint``) is set.

Spans (docs/cli.md "Traces"), each with ``axoneme.policy``,
``axoneme.endpoint`` and ``axoneme.identity`` where they are known:

- ``policy.apply`` / ``policy.delete``: a policy change from any source
  (API, ``--policy-dir``, Kubernetes), its ``policy.regeneration`` a child;
- ``policy.regeneration``: one regeneration, one ``endpoint.regeneration``
  child per endpoint whose policy it wrote (``axoneme.outcome``);
- ``cni.add`` / ``cni.del``: an endpoint made or removed;
- ``k8s.event``: the Kubernetes watcher handling a batch of events;
- ``l7.decision``: an L7 proxy's verdict, sampled (config key
  ``otlp_l7_sample_ratio``, default 0.1).

Off (the default), every call here is a no-op and OpenTelemetry is not
imported. The tracer is per process (one agent runs per process outside tests).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import random
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

from axoneme.core.errors import ConfigError

LOG = logging.getLogger(__name__)

SERVICE_NAME = "axoneme-agent"
ATTR_PREFIX = "axoneme."
DEFAULT_L7_SAMPLE_RATIO = 0.1

# the policy (or policies) a change is about: spans started under it carry it
_POLICY: contextvars.ContextVar[str] = contextvars.ContextVar("axoneme_trace_policy", default="")

T = TypeVar("T")


class _State:
    provider: Any = None
    tracer: Any = None
    l7_sample_ratio: float = DEFAULT_L7_SAMPLE_RATIO


_STATE = _State()


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of ``--otlp-endpoint`` (a base URL, as
    OTEL_EXPORTER_OTLP_ENDPOINT: ``/v1/traces`` is added unless it is there).
    ConfigError naming the flag for anything but an http(s) URL with a host."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--otlp-endpoint: expected an http(s)://HOST:PORT URL of an OTLP/HTTP "
                          f"receiver, got {endpoint!r}")
    try:
        _ = parts.port  # raises for a bad port
    except ValueError as e:
        raise ConfigError(f"--otlp-endpoint: {e} in {endpoint!r}") from None
    path = parts.path.rstrip("/")
    if not path.endswith("/v1/traces"):
        path += "/v1/traces"
    return parts._replace(path=path).geturl()


def configure(endpoint: str | None = None, *, node: str = "", exporter: Any = None,
              l7_sample_ratio: float = DEFAULT_L7_SAMPLE_RATIO) -> None:
    """Start tracing: spans go to the OTLP/HTTP receiver at ``endpoint`` (or to
    ``exporter``, for tests). ConfigError if the URL is bad or OpenTelemetry's
    SDK is not installed."""
    if not 0.0 <= l7_sample_ratio <= 1.0:
        raise ConfigError(f"otlp_l7_sample_ratio must be between 0 and 1, got {l7_sample_ratio!r}")
    url = traces_url(endpoint) if endpoint else None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError as e:  # pragma: no cover - the agent extra installs it
        raise ConfigError(f"--otlp-endpoint needs OpenTelemetry's SDK ({e}): "
                          f"pip install 'axoneme[agent]'") from None
    shutdown()
    attrs = {"service.name": SERVICE_NAME}
    if node:
        attrs["host.name"] = node
    provider = TracerProvider(resource=Resource.create(attrs))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    if url is not None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url, timeout=5),
                                                       schedule_delay_millis=500))
        LOG.info("traces go to %s", url)
    _STATE.provider = provider
    _STATE.tracer = provider.get_tracer("axoneme.agent")
    _STATE.l7_sample_ratio = l7_sample_ratio


def shutdown() -> None:
    """Export what is pending and stop tracing."""
    provider, _STATE.provider, _STATE.tracer = _STATE.provider, None, None
    if provider is not None:
        try:
            provider.shutdown()
        except Exception:
            LOG.warning("flushing traces failed", exc_info=True)


def enabled() -> bool:
    return _STATE.tracer is not None


def _attributes(attrs: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        if value is None or value == "":
            continue
        if not isinstance(value, (str, bool, int, float)):
            value = str(value)
        out[key if "." in key else ATTR_PREFIX + key] = value
    policy = _POLICY.get()
    if policy and ATTR_PREFIX + "policy" not in out:
        out[ATTR_PREFIX + "policy"] = policy
    return out


@contextlib.contextmanager
def span(name: str, **attrs: Any) -> Iterator[Any]:
    """A span (the current one's child) with ``attrs`` as ``axoneme.<key>``
    attributes; None when tracing is off. An exception ends it with status ERROR."""
    tracer = _STATE.tracer
    if tracer is None:
        yield None
        return
    with tracer.start_as_current_span(name, attributes=_attributes(attrs)) as s:
        yield s


def set_attributes(s: Any, **attrs: Any) -> None:
    """Add attributes to a span ``span`` gave (None: tracing is off)."""
    if s is not None:
        s.set_attributes(_attributes(attrs))


def annotate(**attrs: Any) -> None:
    """Add attributes to the current span (what a caller's span could not know)."""
    if _STATE.tracer is not None:
        from opentelemetry import trace

        set_attributes(trace.get_current_span(), **attrs)


@contextlib.contextmanager
def policy_scope(policies: str) -> Iterator[None]:
    """Spans started inside carry ``axoneme.policy`` = ``policies``."""
    token = _POLICY.set(policies)
    try:
        yield
    finally:
        _POLICY.reset(token)


def traced(name: str, attrs: Callable[..., Mapping[str, Any]] | None = None,
           result_attrs: Callable[[Any], Mapping[str, Any]] | None = None,
           ) -> Callable[[Callable[..., Awaitable[T]]], Callable[..., Awaitable[T]]]:
    """Decorate a coroutine method: a span ``name`` around each call, its
    attributes from ``attrs(*args, **kwargs)`` and ``result_attrs(result)``."""
    def wrap(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        @functools.wraps(fn)
        async def run(*args: Any, **kwargs: Any) -> T:
            if _STATE.tracer is None:
                return await fn(*args, **kwargs)
            try:
                given = dict(attrs(*args, **kwargs)) if attrs is not None else {}
            except Exception:  # a span's attributes never fail the call
                given = {}
            scope = (policy_scope(str(given["policy"])) if given.get("policy")
                     else contextlib.nullcontext())
            with scope, span(name, **given) as s:
                result = await fn(*args, **kwargs)
                if result_attrs is not None:
                    with contextlib.suppress(Exception):
                        set_attributes(s, **result_attrs(result))
                return result
        return run
    return wrap


async def within(name: str, coro: Awaitable[T], **attrs: Any) -> T:
    """Await ``coro`` inside a span ``name``."""
    with span(name, **attrs):
        return await coro


def l7_sampled() -> bool:
    """Whether to trace this L7 decision (``otlp_l7_sample_ratio`` of them)."""
    if _STATE.tracer is None:
        return False
    ratio = _STATE.l7_sample_ratio
    return ratio >= 1.0 or (ratio > 0.0 and random.random() < ratio)  # noqa: S311


def l7_decision(flow: Any) -> None:
    """A span for one L7 proxy verdict (a Flow of Type L7), if sampled."""
    if not l7_sampled():
        return
    local = flow.destination if flow.traffic_direction == "INGRESS" else flow.source
    peer = flow.source if flow.traffic_direction == "INGRESS" else flow.destination
    decided = getattr(flow, "decided_by", lambda: ())()
    policy = ", ".join(f"{p.kind}/{p.namespace}/{p.name}" for p in decided) or None
    with span("l7.decision", verdict=flow.verdict.value, protocol=flow.protocol, policy=policy,
              direction=flow.traffic_direction, endpoint=local.id or None,
              identity=local.identity, peer_identity=peer.identity,
              pod=f"{local.namespace}/{local.pod_name}" if local.pod_name else None,
              summary=flow.summary or None):
        pass
