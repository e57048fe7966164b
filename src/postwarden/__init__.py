"""postwarden: a secure, self-hosted SMTP mail service.

The package is laid out along the flow of a message (see ``docs/flow.md``):
``smtp`` (listener, session, protocol) -> ``policy`` -> ``message`` (cleanup)
-> ``queue`` (commit point, runner) -> ``delivery`` (router, Maildir).
"""

__version__ = "0.1.0"
