"""Every protocol limit and timeout, with its named default, in one place.

The values are defaults; ``[limits]`` in the config file overrides them
(see :mod:`postwarden.config`).  Each cites the rule behind it.
"""

from __future__ import annotations

from dataclasses import dataclass

# RFC 5321 4.5.3.1.4: a command line is at most 512 octets including CRLF.
COMMAND_LINE_MAX = 512
# RFC 4954 4: an AUTH command or response line may be up to 12288 octets.
AUTH_LINE_MAX = 12288
# RFC 5321 4.5.3.1.6: a text line is at most 1000 octets including CRLF.
TEXT_LINE_MAX = 1000
# Advertised with SIZE (RFC 1870); 552 5.3.4 above it.
MESSAGE_SIZE_MAX = 50 * 1024 * 1024
# RFC 5321 4.5.3.1.8 asks for at least 100; Postfix allows 1000.
RECIPIENTS_MAX = 1000
# Errors (negative replies to the client) before 421 and disconnect.
ERRORS_MAX = 10
# Commands of any kind in one session before 421 (a session is not a shell).
COMMANDS_MAX = 10000
# RFC 5321 4.5.3.2: 5 minutes for commands, 10 minutes after the final dot.
COMMAND_TIMEOUT = 300.0
DATA_TIMEOUT = 600.0
TLS_HANDSHAKE_TIMEOUT = 30.0
# Delay before answering a failed AUTH (slows guessing).
AUTH_FAIL_DELAY = 1.0
# Header block scanned for Message-ID/Date (bytes); headers beyond are body.
HEADER_SCAN_MAX = 256 * 1024
# Bodies up to this size are committed inline in the database; larger ones
# go to a spool file (both fsync'ed before the 250).
INLINE_BODY_MAX = 128 * 1024
# Bytes received from a client and not yet read by its session above which
# the connection stops reading (smtp/connection.py): TCP holds the client.
SESSION_BUFFER_MAX = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    command_line_max: int = COMMAND_LINE_MAX
    auth_line_max: int = AUTH_LINE_MAX
    text_line_max: int = TEXT_LINE_MAX
    message_size_max: int = MESSAGE_SIZE_MAX
    recipients_max: int = RECIPIENTS_MAX
    errors_max: int = ERRORS_MAX
    commands_max: int = COMMANDS_MAX
    command_timeout: float = COMMAND_TIMEOUT
    data_timeout: float = DATA_TIMEOUT
    tls_handshake_timeout: float = TLS_HANDSHAKE_TIMEOUT
    auth_fail_delay: float = AUTH_FAIL_DELAY
