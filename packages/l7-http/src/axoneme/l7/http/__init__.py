"""axoneme HTTP L7: rule matcher, strict HTTP/1.1 parser and transparent proxy."""

from axoneme.l7.http._parser import HeaderAction, HttpParser, HttpVerdict, apply_actions
from axoneme.l7.http._proxy import HttpProxy, plain_connect
from axoneme.l7.http._replay import Replay, replay_connection
from axoneme.l7.http._rules import HeaderMatch, HTTPRule
from axoneme.l7.http._wire import ACCESS_DENIED, HttpError, RequestHead, parse_request_head

__all__ = ["HTTPRule", "HeaderMatch", "HttpParser", "HttpVerdict", "HeaderAction", "apply_actions", "HttpProxy",
           "plain_connect", "HttpError", "RequestHead", "parse_request_head", "ACCESS_DENIED",
           "replay_connection", "Replay"]
