"""The OpenAPI 3.1 document of the HTTP API (``GET /api/v1/openapi.json``),
written by hand beside :mod:`postwarden.web.api` so that it says exactly
what the handlers accept and answer (tests run Schemathesis against it).

Security exposure: none (a description).
"""

from __future__ import annotations

from typing import Any

from postwarden import __version__

_ERR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _responses(ok: int, schema: dict[str, Any], *errors: int) -> dict[str, Any]:
    out: dict[str, Any] = {str(ok): {"description": "done", **_json(schema)}}
    for code in (401, 403, *errors):
        out[str(code)] = {"description": {
            400: "malformed request", 401: "no valid API key", 403: "scope too narrow",
            404: "not found", 413: "body too large", 422: "invalid value",
            429: "rate limit reached", 503: "cannot queue now, retry later"}[code],
            **_json(_ERR)}
    return out


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, **_json(schema)}


_OBJ = {"type": "object"}
_DELETED = {"type": "object", "properties": {"deleted": {"type": "boolean"}}}


def document() -> dict[str, Any]:
    strings = {"type": "array", "items": {"type": "string"}}
    message = {
        "type": "object", "required": ["queue_id", "sender", "recipients"],
        "properties": {
            "queue_id": {"type": "string"}, "received_at": {"type": "number"},
            "age_seconds": {"type": "number"}, "size": {"type": "integer"},
            "sender": {"type": "string"}, "held": {"type": "boolean"},
            "auth_user": {"type": "string"}, "client_ip": {"type": "string"},
            "recipients": {"type": "array", "items": {"type": "object", "properties": {
                "address": {"type": "string"}, "status": {"type": "string"},
                "attempts": {"type": "integer"}, "next_attempt": {"type": "number"},
                "last_reply": {"type": "string"}}}},
        }}
    key = {"type": "object", "required": ["key_id", "scope"], "properties": {
        "key_id": {"type": "string"}, "scope": {"enum": ["read", "send", "admin"]},
        "account": {"type": "string"}, "label": {"type": "string"},
        "created": {"type": "number"}, "created_by": {"type": "string"},
        "last_used": {"type": ["number", "null"]}, "key": {"type": "string"}}}
    roles = ["admin", "read-only"]
    admin = {"type": "object", "required": ["name", "role"], "properties": {
        "name": {"type": "string"}, "role": {"enum": roles}, "created": {"type": "number"},
        "password": {"type": "string"}}}
    address = {"type": "string", "minLength": 1, "maxLength": 254}
    send_body = {
        "type": "object",
        "properties": {
            "from": address,
            "to": {"oneOf": [address, {"type": "array", "items": address}]},
            "cc": {"oneOf": [address, {"type": "array", "items": address}]},
            "bcc": {"oneOf": [address, {"type": "array", "items": address}]},
            "subject": {"type": "string", "maxLength": 998},
            "text": {"type": "string"}, "html": {"type": "string"},
            "headers": {"type": "object", "additionalProperties": {"type": "string"}},
            "attachments": {"type": "array", "items": {
                "type": "object", "required": ["filename", "content"], "properties": {
                    "filename": {"type": "string"}, "content_type": {"type": "string"},
                    "content": {"type": "string", "description": "base64"}}}},
            "raw": {"type": "string",
                    "description": "a whole RFC 5322 message instead of the fields above"},
        }}
    return {
        "openapi": "3.1.0",
        "info": {"title": "postwarden HTTP API", "version": __version__,
                 "description": "Steer a postwarden mail server and send mail over HTTP. "
                                "Keys: postwarden api-key add --scope read|send|admin."},
        "servers": [{"url": "/"}],
        "components": {
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {"type": "object", "required": ["error"],
                                  "properties": {"error": {"type": "string"}}}},
        },
        "security": [{"apiKey": []}],
        "paths": {
            "/api/v1/status": {"get": {
                "summary": "Queue size by state and the alerts firing (read)",
                "responses": _responses(200, {"type": "object", "required": ["queue"]})}},
            "/api/v1/queue": {"get": {
                "summary": "One page of the queue (read)",
                "parameters": [
                    {"name": "state", "in": "query", "schema": {
                        "enum": ["", "active", "held", "deferred", "corrupt"]}},
                    {"name": "q", "in": "query", "schema": {"type": "string"},
                     "description": "part of a queue id, sender or recipient"},
                    {"name": "sort", "in": "query", "schema": {
                        "enum": ["oldest", "newest", "largest", "sender"]}},
                    {"name": "offset", "in": "query", "schema": {
                        "type": "integer", "minimum": 0, "maximum": 1000000000}},
                    {"name": "limit", "in": "query", "schema": {
                        "type": "integer", "minimum": 1, "maximum": 500}}],
                "responses": _responses(200, {"type": "object", "required": ["total"],
                                              "properties": {
                    "total": {"type": "integer"}, "offset": {"type": "integer"},
                    "messages": {"type": "array", "items": message}}}, 422)}},
            "/api/v1/queue/{queue_id}": {"get": {
                "summary": "A message and its history (read)",
                "parameters": [_path_param("queue_id")],
                "responses": _responses(200, {"type": "object", "properties": {
                    "queue_id": {"type": "string"},
                    "message": {"oneOf": [message, {"type": "null"}]},
                    "history": {"type": "array", "items": _OBJ}}}, 404)}},
            "/api/v1/queue/{queue_id}/{action}": {"post": {
                "summary": "Hold, release, flush or delete a message (admin)",
                "parameters": [_path_param("queue_id"), {
                    "name": "action", "in": "path", "required": True,
                    "schema": {"enum": ["hold", "release", "flush", "delete"]}}],
                "responses": _responses(200, _OBJ, 404)}},
            "/api/v1/accounts": {
                "get": {"summary": "Mail accounts (read)",
                        "responses": _responses(200, {"type": "object", "properties": {
                            "accounts": {"type": "array", "items": _OBJ}}})},
                "post": {"summary": "Create a mail account (admin); without a password "
                                    "one is generated and returned once",
                         "requestBody": _body({"type": "object", "required": ["address"],
                                               "properties": {"address": address,
                                                              "password": {"type": "string"}}}),
                         "responses": _responses(201, _OBJ, 400, 413, 422)}},
            "/api/v1/accounts/{address}": {"delete": {
                "summary": "Delete a mail account (admin)",
                "parameters": [_path_param("address")],
                "responses": _responses(200, _DELETED, 422)}},
            "/api/v1/domains": {
                "get": {"summary": "Local domains (read)",
                        "responses": _responses(200, {"type": "object", "properties": {
                            "domains": {"type": "array", "items": _OBJ}}})},
                "post": {"summary": "Add a local domain (admin)",
                         "requestBody": _body({"type": "object", "required": ["domain"],
                                               "properties": {"domain": {"type": "string"}}}),
                         "responses": _responses(201, _OBJ, 400, 413, 422)}},
            "/api/v1/domains/{domain}": {"delete": {
                "summary": "Delete a local domain (admin)",
                "parameters": [_path_param("domain")],
                "responses": _responses(200, _DELETED, 422)}},
            "/api/v1/aliases": {
                "get": {"summary": "Aliases (read)",
                        "responses": _responses(200, {"type": "object", "properties": {
                            "aliases": {"type": "array", "items": _OBJ}}})},
                "post": {"summary": "Create an alias or add targets to it (admin)",
                         "requestBody": _body({"type": "object",
                                               "required": ["source", "targets"],
                                               "properties": {"source": address,
                                                              "targets": strings}}),
                         "responses": _responses(201, _OBJ, 400, 413, 422)}},
            "/api/v1/aliases/{source}": {"delete": {
                "summary": "Delete an alias (admin)",
                "parameters": [_path_param("source")],
                "responses": _responses(200, _DELETED, 422)}},
            "/api/v1/keys": {
                "get": {"summary": "API keys (admin)",
                        "responses": _responses(200, {"type": "object", "properties": {
                            "keys": {"type": "array", "items": key}}})},
                "post": {"summary": "Create an API key (admin); the key is returned once",
                         "requestBody": _body({"type": "object", "required": ["scope"],
                                               "properties": {
                             "scope": {"enum": ["read", "send", "admin"]},
                             "account": {"type": "string"}, "label": {"type": "string"}}}),
                         "responses": _responses(201, key, 400, 413, 422)}},
            "/api/v1/keys/{key_id}": {"delete": {
                "summary": "Revoke an API key (admin)",
                "parameters": [_path_param("key_id")],
                "responses": _responses(200, _DELETED, 422)}},
            "/api/v1/admins": {
                "get": {"summary": "Admin accounts of the web admin (admin)",
                        "responses": _responses(200, {"type": "object", "properties": {
                            "admins": {"type": "array", "items": admin}}})},
                "post": {"summary": "Create an admin account (admin); a generated "
                                    "password is returned once",
                         "requestBody": _body({"type": "object", "required": ["name"],
                                               "properties": {
                             "name": {"type": "string"}, "role": {"enum": roles},
                             "password": {"type": "string"}}}),
                         "responses": _responses(201, admin, 400, 413, 422)}},
            "/api/v1/admins/{name}": {"delete": {
                "summary": "Delete an admin account (admin; never the last admin)",
                "parameters": [_path_param("name")],
                "responses": _responses(200, _DELETED, 422)}},
            "/api/v1/admins/{name}/role": {"post": {
                "summary": "Set an admin account's role (admin; the last admin stays admin)",
                "parameters": [_path_param("name")],
                "requestBody": _body({"type": "object", "required": ["role"],
                                      "properties": {"role": {"enum": roles}}}),
                "responses": _responses(200, admin, 400, 413, 422)}},
            "/api/v1/admins/{name}/password": {"post": {
                "summary": "Set an admin account's password, given or generated (returned "
                           "once); its sessions end (admin)",
                "parameters": [_path_param("name")],
                "requestBody": _body({"type": "object",
                                      "properties": {"password": {"type": "string"}}}),
                "responses": _responses(200, _OBJ, 400, 413, 422)}},
            "/api/v1/trace": {"get": {
                "summary": "Find messages and their history, as postwarden trace (read)",
                "parameters": [
                    {"name": n, "in": "query", "schema": {"type": "string"}}
                    for n in ("id", "message_id", "from", "to")] + [
                    {"name": "hours", "in": "query", "schema": {
                        "type": "number", "exclusiveMinimum": 0, "maximum": 8784}},
                    {"name": "limit", "in": "query", "schema": {
                        "type": "integer", "minimum": 1, "maximum": 500}}],
                "responses": _responses(200, {"type": "object", "properties": {
                    "messages": {"type": "array", "items": _OBJ}}}, 422)}},
            "/api/v1/quarantine": {"get": {
                "summary": "Messages held by a content filter (read)",
                "responses": _responses(200, {"type": "object", "properties": {
                    "held": {"type": "array", "items": _OBJ}}})}},
            "/api/v1/quarantine/{held_id}/{action}": {"post": {
                "summary": "Release or delete a held message (admin)",
                "parameters": [_path_param("held_id"), {
                    "name": "action", "in": "path", "required": True,
                    "schema": {"enum": ["release", "delete"]}}],
                "responses": _responses(200, _OBJ, 404)}},
            "/api/v1/bans": {
                "get": {"summary": "Active bans (read)",
                        "responses": _responses(200, {"type": "object", "properties": {
                            "bans": {"type": "array", "items": _OBJ}}})},
                "post": {"summary": "Ban an address or network (admin)",
                         "requestBody": _body({"type": "object", "required": ["address"],
                                               "properties": {
                             "address": {"type": "string"}, "reason": {"type": "string"},
                             "hours": {"type": "number", "exclusiveMinimum": 0}}}),
                         "responses": _responses(201, _OBJ, 400, 413, 422)}},
            "/api/v1/bans/{address}": {"delete": {
                "summary": "Lift a ban (admin)",
                "parameters": [_path_param("address")],
                "responses": _responses(200, _DELETED, 404, 422)}},
            "/api/v1/dns/{domain}": {"get": {
                "summary": "The DNS records a local domain needs; with check=1 also what the "
                           "resolver finds for each (read)",
                "parameters": [_path_param("domain"),
                               {"name": "check", "in": "query", "required": False,
                                "schema": {"type": "string", "enum": ["0", "1"]}}],
                "responses": _responses(200, _OBJ, 404, 503)}},
            "/api/v1/settings": {"get": {
                "summary": "The active config file, secrets masked (admin)",
                "responses": _responses(200, _OBJ)}},
            "/api/v1/webhooks": {
                "get": {"summary": "Delivery webhooks of the accounts (read)",
                        "responses": _responses(200, {"type": "object", "properties": {
                            "webhooks": {"type": "array", "items": _OBJ}}})},
                "post": {"summary": "Set an account's delivery webhook (admin); the "
                                    "signing secret is returned once",
                         "requestBody": _body({"type": "object", "required": ["account", "url"],
                                               "properties": {"account": address,
                                                              "url": {"type": "string"}}}),
                         "responses": _responses(201, _OBJ, 400, 413, 422)}},
            "/api/v1/webhooks/{account}": {"delete": {
                "summary": "Remove an account's delivery webhook (admin)",
                "parameters": [_path_param("account")],
                "responses": _responses(200, _DELETED, 422)}},
            "/api/v1/messages": {"post": {
                "summary": "Send a message as the send key's account",
                "requestBody": _body(send_body),
                "responses": _responses(202, {"type": "object", "required": ["queue_id"],
                                              "properties": {"queue_id": {"type": "string"}}},
                                        400, 413, 422, 429, 503)}},
        },
    }
