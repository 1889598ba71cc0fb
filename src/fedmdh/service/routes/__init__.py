"""The service's routes, one module per resource: :mod:`.pages` (the page and sign-in), :mod:`.tasks` (submit,
list, follow, resume), :mod:`.ledger` (show, verify) and :mod:`.models` (download, predict)."""
