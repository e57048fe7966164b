"""The web admin and the HTTP API, served on the ``[admin]`` listener.

* :mod:`postwarden.web.store`: admin accounts, their sessions, login
  failures and API keys (tables ``webadmin_*`` of the shared database);
* :mod:`postwarden.web.security`: session cookies, CSRF tokens, response
  headers;
* :mod:`postwarden.web.app`: the pages (server-rendered Jinja2 templates
  with autoescape, a little JavaScript that only enhances them).

Security exposure: the whole server can be steered from here; everything
but the login page needs a session of an admin account, every state change
is a POST carrying the session's CSRF token, and the listener stays on
loopback unless the administrator says otherwise (``[admin] address``).
"""
