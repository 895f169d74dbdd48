"""The node API (HTTP): how a worker reports to and hears from fedpipe, as its verified node.

The logic is `shared.node_api.NodeApi`; this module turns a Flask request into its
arguments and its Reply into a response. In production it is a 2nd-gen function with
internal ingress, invoked with a Google-signed ID token (infra/main.tf).
"""

from __future__ import annotations

from functools import cache

import flask
import functions_framework

from shared import clients
from shared.identity import TokenVerifier
from shared.node_api import MAX_BODY_BYTES, NodeApi


@cache
def api() -> NodeApi:
    return NodeApi(clients.services(), TokenVerifier(clients.settings()))


@functions_framework.http
def node_api(request: flask.Request) -> flask.Response:
    request.max_content_length = MAX_BODY_BYTES  # a bigger body is answered 413 unread
    body = request.get_data(cache=False)
    reply = api().handle(request.method, request.path, request.headers.get("Authorization"), dict(request.args), body)
    if isinstance(reply.body, bytes):
        return flask.Response(reply.body, status=reply.status, mimetype="application/octet-stream")
    return flask.make_response(flask.jsonify(reply.body), reply.status)
