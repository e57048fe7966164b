"""Content filters: what every message passing through postwarden is
checked for after DATA and before the 250.

- :mod:`.verdict`: what a filter is given and answers (five actions);
- :mod:`.chain`: the filters of one direction, run in order, with
  timeouts, fail-closed (451) or fail-open, and the large-message skip;
- :mod:`.service`: the session's one call; quarantine, notices, rewrites;
- filters: :mod:`.rules` (built-in spam rules), :mod:`.attachments`,
  :mod:`.dlp` (outgoing content review), :mod:`.clamav`, :mod:`.rspamd`;
- :mod:`.mime`: the bounded MIME walker they share;
- :mod:`.settings`: ``[filters]`` of the config file.
"""

from postwarden.filter.settings import FilterSettings

__all__ = ["FilterSettings"]
