"""Setup and client onboarding: interactive ``init``, client settings,
autoconfiguration over HTTP, ``doctor`` and schema upgrades' CLI."""
